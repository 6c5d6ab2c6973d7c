"""A pre-allocated KV cache for a batch of rows of different lengths, rolled back by moving per-row pointers.

Every layer owns keys and values of shape [rows, kv_heads, capacity, head_dim], allocated once. A forward writes
its block of `width` new tokens for row b at columns `starts[b] .. starts[b] + width - 1` (one scatter per layer,
no concatenation) and attends to columns `0 .. span - 1`, span = max(starts) + width. What each query may see is
the caller's 4D mask (`block_mask`): the row's committed prefix (columns < starts[b]) plus the part of the new
block the caller allows (causal for a chain, ancestors for a tree). Anything a row wrote beyond its committed
length (rejected drafts, padding) is therefore invisible, and the next write simply overwrites it: rolling back
is forgetting, done on the host, with no tensor work.

`forward_on_cache` runs a model's decoder over such a block (the target's verification forward, a token drafter's
drafting forward) and `head_logits` applies its LM head; drafters and the decoder share them.

Models see this object as their cache argument (`models.compat.cache_argument` names it for the installed
transformers): Llama-style attention calls `update(key, value, layer_idx, ...)` and, given a 4D mask,
transformers uses it as is. Targets whose attention needs something else (sliding windows,
linear attention layers) are refused by `check_supported`.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from models.compat import cache_argument


def check_supported(model) -> None:
    config = model.config
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"} or getattr(config, "sliding_window", None) and getattr(
            config, "use_sliding_window", True):
        raise ValueError(f"{config.model_type}: the speculative decoder supports full-attention models only "
                         f"(layer types {sorted(layer_types)}, sliding_window={getattr(config, 'sliding_window', None)})")


class RaggedKVCache:
    def __init__(self, num_layers: int, rows: int, kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (rows, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.capacity = capacity
        self.device = device
        self._row_index = torch.arange(rows, device=device)[:, None]
        self._columns: torch.Tensor | None = None
        self._slice: slice | None = None
        self._span = self._start = 0

    @classmethod
    def for_model(cls, model, rows: int, capacity: int, num_layers: int | None = None) -> "RaggedKVCache":
        config = model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        parameter = next(model.parameters())
        return cls(num_layers or config.num_hidden_layers, rows, getattr(config, "num_key_value_heads", heads),
                   head_dim, capacity, parameter.dtype, parameter.device)

    @property
    def rows(self) -> int:
        return self.keys[0].shape[0]

    def begin(self, starts: list[int], width: int) -> int:
        """Direct the next forward's writes to columns starts[b] + 0..width-1; returns the span it will read."""
        span = max(starts) + width
        if span > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions is full (a write reaches {span})")
        if len(set(starts)) == 1:  # one row, or rows in step: a plain slice write
            self._slice, self._columns = slice(starts[0], span), None
        else:
            self._slice = None
            self._columns = torch.tensor(starts, device=self.device)[:, None] + torch.arange(width, device=self.device)
        self._span = span
        self._start = max(starts)
        return span

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Columns before the block being written, for the row furthest along. transformers 5.0-5.23 ask for it
        to build `cache_position` when none is given; we pass positions and a 4D mask, so it only has to exist."""
        return self._start

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value [rows, kv_heads, width, head_dim] -> this layer's keys/values for columns 0..span-1.

        Whatever else attention passes (5.0's positional `cache_kwargs`, 5.24's `kwargs=`) carries nothing this
        cache needs (positions come from the caller's block), so it is accepted in every form and ignored."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._slice is not None:
            keys[:, :, self._slice] = key
            values[:, :, self._slice] = value
        else:
            keys[self._row_index, :, self._columns] = key.transpose(1, 2).to(keys.dtype)
            values[self._row_index, :, self._columns] = value.transpose(1, 2).to(values.dtype)
        return keys[:, :, : self._span], values[:, :, : self._span]

    def move(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Copy columns `sources` [rows, n] onto `destinations` [rows, n], per row (a tree's accepted path)."""
        for keys, values in zip(self.keys, self.values):
            keys[self._row_index, :, destinations] = keys[self._row_index, :, sources]
            values[self._row_index, :, destinations] = values[self._row_index, :, sources]

    def keep_rows(self, rows: list[int]) -> None:
        """Drop finished rows so later forwards stop paying for them."""
        index = torch.tensor(rows, device=self.device)
        self.keys = [keys.index_select(0, index) for keys in self.keys]
        self.values = [values.index_select(0, index) for values in self.values]
        self._row_index = torch.arange(len(rows), device=self.device)[:, None]


def block_mask(starts: list[int], span: int, local: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[rows, 1, width, span] bool: query i of row b sees columns < starts[b] and, inside its block, the columns
    `local[i]` allows (local is [width, block columns], block column c = starts[b] + c; or [rows, width, block]
    where each row has a tree of its own)."""
    width, block = local.shape[-2:]
    relative = torch.arange(span, device=device)[None, :] - torch.tensor(starts, device=device)[:, None]
    prefix = relative < 0
    inside = (relative >= 0) & (relative < block)
    columns = relative.clamp(0, block - 1)
    if local.dim() == 3:  # [rows, width, span]: row b's mask read at row b's columns
        allowed = local.to(device).gather(2, columns[:, None, :].expand(-1, width, -1))
    else:
        allowed = local.to(device)[:, columns].permute(1, 0, 2)  # [rows, width, span]
    return (prefix[:, None, :] | (inside[:, None, :] & allowed)).unsqueeze(1)


def pad_rows(rows: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, rows)))
    return torch.tensor([row + [0] * (width - len(row)) for row in rows], device=device)


def forward_on_cache(model: PreTrainedModel, cache: RaggedKVCache, tokens: torch.Tensor, starts: list[int],
             local: torch.Tensor, relative_positions: torch.Tensor, offset: int = 0,
             inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
    """Last hidden states [rows, width, d] for a block written after each row's `starts[b]` committed columns
    (at column starts[b] + offset + i), seeing the prefix and the block columns `local` allows; `local` and
    `relative_positions` are shared by the rows ([width, width], [width]) or per row ([rows, ...])."""
    device = cache.device
    span = cache.begin([start + offset for start in starts], tokens.shape[1])
    relative = relative_positions.to(device)
    positions = torch.tensor(starts, device=device)[:, None] + (relative if relative.dim() == 2 else relative[None, :])
    mask = block_mask(starts, span, local, device)
    arguments = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": tokens}
    decoder = model.get_decoder()
    return decoder(**arguments, attention_mask=mask, position_ids=positions, use_cache=True,
                   **cache_argument(decoder, cache)).last_hidden_state


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    return model.get_output_embeddings()(hidden).float()


@contextlib.contextmanager
def captured_layers(target: PreTrainedModel, layers: tuple[int, ...] | None):
    """Within the block, `captured[0]` after each target forward is the outputs of `layers` (decoder layers,
    0-based), concatenated [B, T, k·d]; with `layers` None nothing is captured (the last hidden state serves)."""
    captured: list[torch.Tensor | None] = [None]
    if not layers:
        yield captured
        return
    parts: dict[int, torch.Tensor] = {}
    decoder_layers = target.get_decoder().layers

    def keep(index):
        def hook(module, inputs, output):
            parts[index] = output[0] if isinstance(output, tuple) else output
            if len(parts) == len(layers):
                captured[0] = torch.cat([parts[i] for i in layers], -1)
                parts.clear()
        return hook
    handles = [decoder_layers[index].register_forward_hook(keep(index)) for index in layers]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
