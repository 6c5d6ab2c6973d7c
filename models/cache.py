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
transformers uses it as is. Models with sliding-window layers (Gemma 3, Qwen2 with `use_sliding_window`) get one
mask per layer type (`layer_masks`): a sliding layer's query at position p also loses every key at a position
≤ p - window, which is what transformers' own sliding masks and caches do. Every column keeps its keys (nothing is
evicted), so rollback stays a pointer move. Targets whose attention is something else (linear or chunked
attention layers) are refused by `check_supported`.
"""
from __future__ import annotations

import contextlib

import torch
from transformers import PreTrainedModel

from models.compat import cache_argument


SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}


def layer_types(config) -> list[str]:
    """Each decoder layer's attention kind as the model runs it: its config's `layer_types`, else full attention
    everywhere, or a sliding window everywhere where an older config only sets `sliding_window` (Mistral)."""
    declared = getattr(config, "layer_types", None)
    if declared:
        return list(declared)
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return ["sliding_attention" if sliding else "full_attention"] * config.num_hidden_layers


def sliding_window(config) -> int | None:
    """The window of the sliding layers (a query at position p sees keys at positions > p - window), or None."""
    return getattr(config, "sliding_window", None) if "sliding_attention" in layer_types(config) else None


def check_supported(model) -> None:
    config = model.config
    kinds = set(layer_types(config))
    if not kinds <= SUPPORTED_LAYER_TYPES or "sliding_attention" in kinds and not sliding_window(config):
        raise ValueError(f"{config.model_type}: the speculative decoder supports full and sliding-window attention "
                         f"layers (layer types {sorted(kinds)}, sliding_window="
                         f"{getattr(config, 'sliding_window', None)})")
    if getattr(config, "attn_logit_softcapping", None):
        raise ValueError(f"{config.model_type}: attention logit soft-capping (attn_logit_softcapping="
                         f"{config.attn_logit_softcapping}) needs eager attention, which the decoder does not run")


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


def windowed(mask: torch.Tensor, positions: torch.Tensor, starts: list[int], window: int, local: torch.Tensor,
             offset: int = 0) -> torch.Tensor:
    """`mask` ([rows, 1, width, span], `block_mask`) with every key at a position ≤ the query's - `window` hidden
    (a sliding layer's mask). `positions` [rows, width]: the block's, written at columns starts[b] + offset + i.
    Committed column c holds position c. An earlier block's column (a drafter's previous levels, offset > 0) is
    read as position = its column: exact for a chain (`local` causal over the whole block), and for a tree never
    below its true position (starts[b] + its depth), so it is never hidden wrongly and never shown wrongly while
    the drafted depth stays below the window (a query sees no block ancestor further back than that), which is
    required of trees."""
    rows, _, width, span = mask.shape
    device = mask.device
    positions = positions.to(device)
    depth = int((positions - torch.tensor(starts, device=device)[:, None]).max())
    chain = torch.equal(local.bool().cpu(), torch.ones(local.shape, dtype=torch.bool).tril(offset))
    if offset and depth >= window and not chain:
        raise ValueError(f"a sliding window of {window} tokens is shorter than a drafted tree's depth of {depth + 1}: "
                         "draft fewer levels per step (the tree's depth) than the window")
    key_positions = torch.arange(span, device=device).expand(rows, span).clone()
    columns = torch.tensor(starts, device=device)[:, None] + offset + torch.arange(width, device=device)
    inside = columns < span
    row_index = torch.arange(rows, device=device)[:, None].expand(-1, width)
    key_positions[row_index[inside], columns[inside]] = positions[inside]
    return mask & (key_positions[:, None, None, :] > positions[:, None, :, None] - window)


def layer_masks(model: PreTrainedModel, mask: torch.Tensor, positions: torch.Tensor, starts: list[int],
                local: torch.Tensor, offset: int = 0) -> torch.Tensor | dict[str, torch.Tensor]:
    """What a model's decoder takes as its attention mask: the block mask as is for full-attention models, or one
    mask per layer type where some layers slide (transformers' models accept that mapping and use it as given)."""
    window = sliding_window(model.config)
    if window is None:
        return mask
    return {"full_attention": mask, "sliding_attention": windowed(mask, positions, starts, window, local, offset)}


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
    mask = layer_masks(model, block_mask(starts, span, local, device), positions, starts, local, offset)
    arguments = {"inputs_embeds": inputs_embeds} if inputs_embeds is not None else {"input_ids": tokens}
    decoder = model.get_decoder()
    return decoder(**arguments, attention_mask=mask, position_ids=positions, use_cache=True,
                   **cache_argument(decoder, cache)).last_hidden_state


def head_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's logits (fp32), soft-capped where the model's config says so (Gemma 2's
    final_logit_softcapping), as the model's own forward computes them."""
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


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
