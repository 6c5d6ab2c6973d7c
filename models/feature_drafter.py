"""Feature-level drafters (EAGLE-style), the drafter FSPAD builds on.

The drafter works on the target's last hidden states ("features") instead of tokens: at position t it reads the
target's feature f_t fused with the embedding of the token that follows, x_{t+1}, runs one Llama decoder layer
(causal over the sequence) and predicts the next feature f̂_{t+1}; the target's own frozen LM head turns f̂_{t+1}
into a distribution over x_{t+2} (EAGLE, METHODS.md §8). Drafting further, it feeds its own predicted features
back in.

FSPAD's feature sampling (METHODS.md §7) gives the drafter the token the target actually produced, not only the
feature it came from. The paper's exact operator is not verified (§9); our reading, `feature_sampling=true`:
the feature is sampled in embedding space, f_t ⊙ e(x_{t+1}), and fused alongside e(x_{t+1}).

EAGLE-3 (METHODS.md §8) changes three things, each a spec field here:
- `feature_layers`: the feature is a fusion of several of the target's layers (outputs of decoder layers with those
  0-based indices, e.g. a low, a middle and a high one), reduced by a linear map to the hidden width; while
  drafting, the drafter's own output stands in for that fusion. None: the target's last hidden state (EAGLE-1).
- `draft_vocab_size`: the drafter has its own norm and LM head over the N most frequent tokens of the training data
  (`d2t`: draft id -> target id), started from the target's head rows; logits are -inf outside it. Its output is
  then a hidden state of its own, not a regression of the target's feature.
- training-time test (`losses.feature.FeatureLoss.unroll`): in training the drafter is unrolled on its own
  outputs (`FeatureDrafter.unrolled`), with the attention pattern drafting has, and scored at every step.

Three norms the engines' EAGLE-3 layout names (vLLM's `llama_eagle3.py` reads them; speculators' Eagle-3.1 trains
with some of them), each a spec field, off by default:
- `norm_before_fc`: one RMSNorm over the concatenated target features [k·d] before `reduce` (`input_norm`).
- `norm_before_residual`: the residual stream starts from hidden_norm(f) instead of f itself.
- `norm_output`: the hidden state fed back while drafting is the output after the drafter's final norm, not
  before it (the head reads the normed output either way).

`layout` is how the feature and the next token's embedding enter the decoder layer:
- `linear` (EAGLE-1): `fuse`, a linear map of [f_t, e(x_{t+1})] to d, then a standard Llama decoder layer.
- `eagle3` (EAGLE-3's midlayer, the layout vLLM and SGLang load): the embedding and the feature are RMS-normed
  separately (`input_layernorm`, `hidden_norm`), concatenated [e, f] (2d wide) into the attention's q/k/v
  projections, and the residual stream starts from the feature itself. Only this layout exports to the engines'
  EAGLE-3 format (`models.eagle3_export`).

The target's embedding (and, without a draft vocabulary, its LM head) is not copied into the drafter: it is the
target's, frozen. A saved feature drafter is `feature_drafter.json` + `model.safetensors` holding only its own
weights, in draftsmith's format; the export stage writes the engines' EAGLE-3 and speculators layouts from it.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from transformers import DynamicCache, LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from infra.rundir import writing
from infra.settings import SettingsError, at_least, check_fields, one_of
from models.cache import RaggedKVCache, block_mask, head_logits, pad_rows
from models.compat import cache_argument
from models.draft import DraftDefaults
from models.drafter import ReducedVocabHead, frequent_tokens
from models.loading import check_safetensors

CONFIG_FILE = "feature_drafter.json"


@dataclass(frozen=True)
class FeatureDrafterSpec:
    SECTION: ClassVar[str] = "drafter"
    name: str = "feature-drafter"
    feature_sampling: bool = False  # FSPAD: fuse f_t ⊙ e(x_{t+1}) instead of f_t
    intermediate_size: int | None = None  # decoder layer MLP width (default: the target's)
    feature_layers: tuple[int, ...] | str | None = None  # EAGLE-3: fuse these target layers' outputs (None: last
                                        # state; "auto": a low, a middle and a high one for the target's depth)
    draft_vocab_size: int | None = None  # EAGLE-3: own norm + head over the N most frequent training tokens
    layout: str = "linear"  # linear (EAGLE-1's fc over [f, e]) | eagle3 (EAGLE-3's midlayer: normed [e, f] into q/k/v)
    norm_before_fc: bool = False        # eagle3: RMSNorm over the fused target layers before `reduce`
    norm_before_residual: bool = False  # eagle3: the residual starts from hidden_norm(f), not f
    norm_output: bool = False           # own head: feed back the normed output instead of the pre-norm one
    own_embedding: bool = False         # a frozen embedding of its own (an engine folder's embed_tokens), not the
                                        # target's: what an engine serving that folder embeds with
    seed: int = 0
    LIMITS: ClassVar[dict] = {"intermediate_size": at_least(1, none_ok=True),
                              "draft_vocab_size": at_least(2, none_ok=True), "layout": one_of("linear", "eagle3")}

    def __post_init__(self) -> None:
        if isinstance(self.feature_layers, str) and self.feature_layers != "auto":
            raise SettingsError(f"drafter.feature_layers={self.feature_layers!r}: a list of layer indices, 'auto' or "
                                "null", "drafter.feature_layers")
        if self.feature_layers is not None and self.feature_layers != "auto":
            layers = tuple(int(layer) for layer in self.feature_layers)
            if not layers or len(set(layers)) != len(layers):
                raise ValueError(f"drafter.feature_layers={list(self.feature_layers)}: name distinct layer indices")
            object.__setattr__(self, "feature_layers", layers)
        check_fields(self)
        if self.layout == "eagle3" and self.feature_sampling:
            raise ValueError("drafter.feature_sampling (FSPAD) multiplies the feature by the embedding before the "
                             "linear fusion; it needs drafter.layout=linear")
        if self.layout != "eagle3" and (self.norm_before_fc or self.norm_before_residual or self.norm_output):
            raise ValueError("drafter.norm_before_fc, norm_before_residual and norm_output are norms of EAGLE-3's "
                             "layout; they need drafter.layout=eagle3")
        if self.norm_before_fc and len(self.feature_layers or ()) < 2:
            raise ValueError("drafter.norm_before_fc norms the fused target layers: set drafter.feature_layers "
                             "(two or more)")
        if self.norm_output and not self.draft_vocab_size:
            raise ValueError("drafter.norm_output needs the drafter's own norm and head: set drafter.draft_vocab_size")


def auto_feature_layers(num_layers: int) -> tuple[int, ...]:
    """`drafter.feature_layers=auto`: the outputs of layers 2, L/2 and L-3 of an L-layer target (SmolLM2's 30 give
    2, 15, 27; Qwen2.5-0.5B's 24 give 2, 12, 21; Gemma 3 270M's 18 give 2, 9, 15); fewer, distinct, for a target
    too shallow for three."""
    return tuple(sorted({min(2, num_layers - 1), num_layers // 2, max(num_layers - 3, 0)}))


class Eagle3Layer(LlamaDecoderLayer):
    """EAGLE-3's decoder layer: attention over [input_layernorm(e), hidden_norm(f)] (q/k/v read 2d), residual from
    f; then the usual post-attention norm and MLP. Called as layer(features, embeddings, **attention arguments)."""

    def __init__(self, config: LlamaConfig, norm_before_residual: bool = False) -> None:
        super().__init__(config, layer_idx=0)
        self.norm_before_residual = norm_before_residual
        attention, width = self.self_attn, 2 * config.hidden_size
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attention, name)
            setattr(attention, name, torch.nn.Linear(width, old.out_features, bias=old.bias is not None))
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, embeddings: torch.Tensor, **attention) -> torch.Tensor:
        attention.pop("use_cache", None)
        normed = self.hidden_norm(hidden_states)
        both = torch.cat([self.input_layernorm(embeddings), normed], dim=-1)
        output = self.self_attn(hidden_states=both, **attention)
        residual = normed if self.norm_before_residual else hidden_states
        hidden = residual + (output[0] if isinstance(output, tuple) else output)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class FeatureDrafter(torch.nn.Module):
    def __init__(self, spec: FeatureDrafterSpec, target_config, layer_config: LlamaConfig | None = None) -> None:
        """`layer_config`: the decoder layer's own config (heads, rope, eps) where it is not the one derived from
        the target's (a drafter read from an engine folder); its width must be the target's."""
        super().__init__()
        if spec.feature_layers == "auto":
            spec = replace(spec, feature_layers=auto_feature_layers(target_config.num_hidden_layers))
        self.spec = spec
        hidden = target_config.hidden_size
        self.layer_config = layer_config or LlamaConfig(
            hidden_size=hidden, intermediate_size=spec.intermediate_size or target_config.intermediate_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
            num_hidden_layers=1, max_position_embeddings=target_config.max_position_embeddings,
            rope_theta=getattr(target_config, "rope_theta", 10000.0), rms_norm_eps=target_config.rms_norm_eps,
            vocab_size=target_config.vocab_size)
        if self.layer_config.hidden_size != hidden:
            raise ValueError(f"a feature drafter {self.layer_config.hidden_size} wide reads the target's embedding, "
                             f"{hidden} wide: the widths must match")
        self.layer_config._attn_implementation = "sdpa"
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        layers = spec.feature_layers or ()
        for layer in layers:
            if not 0 <= layer < target_config.num_hidden_layers:
                raise ValueError(f"drafter.feature_layers: layer {layer} is outside the target's "
                                 f"{target_config.num_hidden_layers} layers (0-based)")
        self.reduce = torch.nn.Linear(len(layers) * hidden, hidden, bias=False) if len(layers) > 1 else None
        self.input_norm = (LlamaRMSNorm(len(layers) * hidden, eps=self.layer_config.rms_norm_eps)
                           if spec.norm_before_fc else None)
        if spec.layout == "eagle3":
            self.fuse, self.layer = None, Eagle3Layer(self.layer_config, spec.norm_before_residual)
        else:
            self.fuse = torch.nn.Linear(2 * hidden, hidden, bias=False)
            self.layer = LlamaDecoderLayer(self.layer_config, layer_idx=0)
        torch.random.set_rng_state(generator_state)
        self.rotary = LlamaRotaryEmbedding(self.layer_config)
        self.embed_tokens = None
        if spec.own_embedding:
            self.embed_tokens = torch.nn.Embedding(target_config.vocab_size, hidden)
            self.embed_tokens.requires_grad_(False)
        self.norm = self.head = None
        if spec.draft_vocab_size:
            self.norm = LlamaRMSNorm(hidden, eps=target_config.rms_norm_eps)
            self.head = ReducedVocabHead(hidden, torch.arange(spec.draft_vocab_size), target_config.vocab_size)

    @property
    def feature_layers(self) -> tuple[int, ...] | None:
        return self.spec.feature_layers

    def input_embeddings(self, target: PreTrainedModel) -> torch.nn.Module:
        """What embeds the tokens the drafter reads: its own embedding if it has one, else the target's table as
        engines share it with an EAGLE drafter: the rows as stored, without a scale the target's own forward
        applies (Gemma's sqrt(hidden), inside transformers' embedding module but outside vLLM's)."""
        if self.embed_tokens is not None:
            return self.embed_tokens
        shared = target.get_input_embeddings()
        if type(shared) is torch.nn.Embedding:
            return shared
        return torch.nn.Embedding.from_pretrained(shared.weight, freeze=True)  # the same storage, read as stored

    def start_head(self, d2t: torch.Tensor, target_head: torch.Tensor) -> None:
        """Own head over the draft vocabulary `d2t`, started from the target's head rows."""
        with torch.no_grad():
            self.head.d2t.copy_(d2t.to(self.head.d2t.device))
            self.head.weight.copy_(target_head[d2t.to(target_head.device)])

    def logits(self, hidden: torch.Tensor, target: PreTrainedModel, compact: bool = False) -> torch.Tensor:
        """Distribution (logits) over the next token from the drafter's outputs: its own head over the draft
        vocabulary ([.., N] with `compact`, else [.., V] with -inf outside it), or the target's frozen head."""
        if self.head is None:
            return head_logits(target, hidden)
        normed = hidden if self.spec.norm_output else self.norm(hidden)
        return (self.head.compact(normed) if compact else self.head(normed)).float()

    def step(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor, cache=None) -> torch.Tensor:
        """One pass of the decoder layer: outputs [B, T, d] from features f_t (the target's, [B, T, k·d] or [B, T,
        d], or the drafter's own [B, T, d]) and e(x_{t+1}) [B, T, d]. With FSPAD's feature sampling the feature is
        first sampled in embedding space, f_t ⊙ e(x_{t+1}). With `norm_output` the outputs are after the drafter's
        final norm. Training and decoding both go through here."""
        features = features.to(next_embeddings.dtype)
        if self.reduce is not None and features.shape[-1] != next_embeddings.shape[-1]:
            if self.input_norm is not None:
                features = self.input_norm(features)
            features = self.reduce(features)  # the target's layers, fused (own outputs are already this wide)
        attention = {"attention_mask": attention_mask, "position_ids": position_ids,
                     "position_embeddings": self.rotary(next_embeddings, position_ids)}
        if cache is not None:
            attention |= cache_argument(self.layer.self_attn, cache)
        if self.fuse is None:
            output = self.layer(features, next_embeddings, **attention)
            return self.norm(output) if self.spec.norm_output else output
        if self.spec.feature_sampling:
            features = features * next_embeddings
        output = self.layer(self.fuse(torch.cat([features, next_embeddings], dim=-1)), use_cache=cache is not None,
                            **attention)
        return output[0] if isinstance(output, tuple) else output

    def forward(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Predicted next features [B, T, d] from target features f_t [B, T, d], embeddings of x_{t+1}
        [B, T, d] and a [B, T] padding mask (1 = real token)."""
        batch, width = attention.shape
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(width, width, dtype=torch.bool, device=next_embeddings.device).tril()
        mask = (causal & attention.bool()[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
        return self.step(features, next_embeddings, mask, position_ids)

    def unrolled(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention: torch.Tensor,
                 steps: int) -> list[torch.Tensor]:
        """Training-time test: outputs [B, T, d] of `steps` passes. Pass 0 reads the target's features; pass j at
        position t reads pass j-1's output at t-1 in place of the feature, and attends as drafting would: to pass
        0's entries at positions ≤ t-j and to pass i's entry at t-j+i (i = 1..j). Output j at t is the drafter's
        (j+1)-th draft from a context whose last true feature is f_{t-j}; positions t < j have no such context."""
        batch, width = attention.shape
        device = next_embeddings.device
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        position = torch.arange(width, device=device)
        valid = attention.bool()[:, None, :]
        cache, outputs = DynamicCache(), []
        for j in range(steps):
            masks = [(position[None, :] <= position[:, None] - j)[None] & valid]
            masks += [(position[None, :] == position[:, None] - j + i)[None].expand(batch, -1, -1)
                      for i in range(1, j + 1)]
            mask = torch.cat(masks, -1).unsqueeze(1)  # [B, 1, T, (j+1)T]
            output = self.step(features, next_embeddings, mask, position_ids, cache)
            outputs.append(output)
            features = torch.cat([output.new_zeros(batch, 1, output.shape[-1]), output[:, :-1]], 1)
        return outputs

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        with writing(folder / "model.safetensors"):
            save_file({k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary.")},
                      str(folder / "model.safetensors"))
        (folder / CONFIG_FILE).write_text(json.dumps({"spec": asdict(self.spec),
                                                      "layer": self.layer_config.to_dict()}, indent=2))
        return folder


def build_feature_drafter(spec: FeatureDrafterSpec, target: PreTrainedModel, token_lists=None) -> FeatureDrafter:
    """A fresh feature drafter; with `spec.draft_vocab_size`, its vocabulary is the most frequent tokens of
    `token_lists` (the training data) plus the target's special tokens."""
    drafter = FeatureDrafter(spec, target.config).to(target.device)
    if spec.draft_vocab_size:
        if token_lists is None:
            raise ValueError("drafter.draft_vocab_size needs the training tokens to count; build it in a stage")
        special = [i for i in (target.config.bos_token_id, target.config.eos_token_id,
                               getattr(target.generation_config, "eos_token_id", None)) if isinstance(i, int)]
        d2t, _ = frequent_tokens(token_lists, min(spec.draft_vocab_size, target.config.vocab_size), special)
        if len(d2t) < spec.draft_vocab_size:  # fewer distinct tokens than asked: fill with the lowest unused ids
            unused = torch.ones(target.config.vocab_size, dtype=torch.bool)
            unused[d2t] = False
            d2t = torch.cat([d2t, unused.nonzero()[:, 0][: spec.draft_vocab_size - len(d2t)]]).sort().values
        drafter.start_head(d2t, target.get_output_embeddings().weight.detach())
    return drafter


def load_feature_drafter(folder: Path, target: PreTrainedModel) -> FeatureDrafter:
    saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    if saved["layer"]["hidden_size"] != target.config.hidden_size:
        raise ValueError(f"{folder}: drafter width {saved['layer']['hidden_size']} does not match the target's "
                         f"{target.config.hidden_size}; it was trained for another target")
    drafter = FeatureDrafter(FeatureDrafterSpec(**saved["spec"]), target.config, LlamaConfig.from_dict(saved["layer"]))
    check_safetensors(Path(folder) / "model.safetensors")
    missing, unexpected = drafter.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=False)
    if unexpected or [m for m in missing if not m.startswith("rotary.")]:
        raise ValueError(f"{folder}: weights do not fit (missing {missing}, unexpected {unexpected})")
    return drafter.to(target.device).eval()


class FeatureDraft(DraftDefaults):
    """A feature-level drafter (`models.feature_drafter.FeatureDrafter`) with the target's embedding and head.

    Its input at position t pairs the target feature f_t with the embedding of x_{t+1}; it predicts f_{t+1},
    which the target's head turns into the distribution of x_{t+2}. While drafting, predicted features stand in
    for the target's; the next step re-reads the true ones.
    """

    needs_features = True

    def __init__(self, drafter: torch.nn.Module, target: PreTrainedModel) -> None:
        self.drafter, self.target = drafter, target
        self.networks = (drafter,)  # what the decoder's few-row kernels apply to (models.kernels)
        self.embed = drafter.input_embeddings(target)
        self.feature_layers = getattr(drafter, "feature_layers", None)  # which target features the decoder keeps

    @property
    def device(self) -> torch.device:
        return next(self.drafter.parameters()).device

    def start(self, rows: int, capacity: int) -> None:
        config = self.drafter.layer_config
        parameter = next(self.drafter.parameters())
        self.cache = RaggedKVCache(1, rows, config.num_key_value_heads, config.hidden_size //
                                   config.num_attention_heads, capacity, parameter.dtype, parameter.device)
        self.lengths = [0] * rows  # pairs (f_t, x_{t+1}) held, t = 0 .. length-1
        self.predicted: torch.Tensor | None = None

    def _run(self, features: torch.Tensor, tokens: torch.Tensor, local: torch.Tensor, relative: torch.Tensor,
             offset: int) -> torch.Tensor:
        embeddings = self.embed(tokens)
        span = self.cache.begin([length + offset for length in self.lengths], tokens.shape[1])
        device = embeddings.device
        positions = torch.tensor(self.lengths, device=device)[:, None] + relative.to(device)[None, :]
        mask = block_mask(self.lengths, span, local, device)
        self.predicted = self.drafter.step(features, embeddings, mask, positions, self.cache)
        return self.drafter.logits(self.predicted, self.target)

    def catch_up(self, sequences: list[list[int]], features: torch.Tensor) -> torch.Tensor:
        ends = [len(sequence) - 1 for sequence in sequences]  # pairs up to t = len - 2
        if min(ends) < 1:
            raise ValueError("a feature-level drafter needs prompts of at least 2 tokens (it pairs each target "
                             "feature with the next token)")
        rows = range(len(sequences))
        width = max(1, max(end - length for end, length in zip(ends, self.lengths)))
        index = torch.tensor([[min(length + i, max(end - 1, 0)) for i in range(width)]
                              for length, end in zip(self.lengths, ends)], device=features.device)
        feats = features[torch.arange(len(ends), device=features.device)[:, None], index]
        tokens = pad_rows([sequences[b][self.lengths[b] + 1: ends[b] + 1] for b in rows], features.device)
        logits = self._run(feats, tokens, torch.ones(width, width).tril().bool(), torch.arange(width), 0)
        last = torch.tensor([max(end - length, 1) - 1 for end, length in zip(ends, self.lengths)],
                            device=logits.device)
        every = torch.arange(len(ends), device=logits.device)
        self.predicted = self.predicted[every, last][:, None]
        self.lengths = ends
        return logits[every, last]

    def extend(self, tokens: torch.Tensor, parents: list[int], local: torch.Tensor, relative: torch.Tensor,
               offset: int) -> torch.Tensor:
        features = self.predicted[:, torch.tensor(parents, device=tokens.device)]
        return self._run(features, tokens, local, relative, offset)

    def commit(self, accepted: list[int], fed_drafts: int) -> None:
        pass  # drafted pairs used predicted features: the next catch-up re-feeds them with the target's

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.lengths = [self.lengths[row] for row in rows]
