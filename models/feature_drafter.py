"""Feature-level drafters (EAGLE-style), the drafter FSPAD builds on.

The drafter works on the target's last hidden states ("features") instead of tokens: at position t it reads the
target's feature f_t fused with the embedding of the token that follows, x_{t+1}, runs one Llama decoder layer
(causal over the sequence) and predicts the next feature f̂_{t+1}; the target's own frozen LM head turns f̂_{t+1}
into a distribution over x_{t+2} (EAGLE, METHODS.md §8). Drafting further, it feeds its own predicted features
back in.

FSPAD's feature sampling (METHODS.md §7) gives the drafter the token the target actually produced, not only the
feature it came from. The paper's exact operator is not verified (§9); our reading, `feature_sampling=true`:
the feature is sampled in embedding space, f_t ⊙ e(x_{t+1}), and fused alongside e(x_{t+1}).

The target's embedding and LM head are not copied into the drafter (they are the target's, frozen); a saved
feature drafter is `feature_drafter.json` + `model.safetensors` holding only its own weights, in draftsmith's
format (engines' EAGLE loaders expect their own layouts; exporting to them is not done yet).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from models.cache import RaggedKVCache, block_mask, head_logits, pad_rows
from models.compat import cache_argument

CONFIG_FILE = "feature_drafter.json"


@dataclass(frozen=True)
class FeatureDrafterSpec:
    name: str = "feature-drafter"
    feature_sampling: bool = False  # FSPAD: fuse f_t ⊙ e(x_{t+1}) instead of f_t
    intermediate_size: int | None = None  # decoder layer MLP width (default: the target's)
    seed: int = 0


class FeatureDrafter(torch.nn.Module):
    def __init__(self, spec: FeatureDrafterSpec, target_config) -> None:
        super().__init__()
        self.spec = spec
        hidden = target_config.hidden_size
        self.layer_config = LlamaConfig(
            hidden_size=hidden, intermediate_size=spec.intermediate_size or target_config.intermediate_size,
            num_attention_heads=target_config.num_attention_heads,
            num_key_value_heads=getattr(target_config, "num_key_value_heads", target_config.num_attention_heads),
            num_hidden_layers=1, max_position_embeddings=target_config.max_position_embeddings,
            rope_theta=getattr(target_config, "rope_theta", 10000.0), rms_norm_eps=target_config.rms_norm_eps,
            vocab_size=target_config.vocab_size)
        self.layer_config._attn_implementation = "sdpa"
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(spec.seed)
        self.fuse = torch.nn.Linear(2 * hidden, hidden, bias=False)
        self.layer = LlamaDecoderLayer(self.layer_config, layer_idx=0)
        torch.random.set_rng_state(generator_state)
        self.rotary = LlamaRotaryEmbedding(self.layer_config)

    def fused_inputs(self, features: torch.Tensor, next_embeddings: torch.Tensor) -> torch.Tensor:
        """The decoder layer's input [B, T, d] from f_t and e(x_{t+1}); with FSPAD's feature sampling the feature is
        first sampled in embedding space, f_t ⊙ e(x_{t+1}). Training and decoding both go through here."""
        features = features.to(next_embeddings.dtype)
        if self.spec.feature_sampling:
            features = features * next_embeddings
        return self.fuse(torch.cat([features, next_embeddings], dim=-1))

    def forward(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Predicted next features [B, T, d] from target features f_t [B, T, d], embeddings of x_{t+1}
        [B, T, d] and a [B, T] padding mask (1 = real token)."""
        hidden = self.fused_inputs(features, next_embeddings)
        batch, width = attention.shape
        position_ids = (attention.cumsum(-1) - 1).clamp_min(0)
        causal = torch.ones(width, width, dtype=torch.bool, device=hidden.device).tril()
        mask = (causal & attention.bool()[:, None, :]).unsqueeze(1)  # [B, 1, T, T]
        return self.layer(hidden, attention_mask=mask, position_ids=position_ids,
                          position_embeddings=self.rotary(hidden, position_ids))

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items() if not k.startswith("rotary.")},
                  str(folder / "model.safetensors"))
        (folder / CONFIG_FILE).write_text(json.dumps({"spec": asdict(self.spec),
                                                      "layer": self.layer_config.to_dict()}, indent=2))
        return folder


def build_feature_drafter(spec: FeatureDrafterSpec, target: PreTrainedModel) -> FeatureDrafter:
    return FeatureDrafter(spec, target.config).to(target.device)


def load_feature_drafter(folder: Path, target: PreTrainedModel) -> FeatureDrafter:
    saved = json.loads((Path(folder) / CONFIG_FILE).read_text())
    drafter = FeatureDrafter(FeatureDrafterSpec(**saved["spec"]), target.config)
    if drafter.layer_config.hidden_size != saved["layer"]["hidden_size"]:
        raise ValueError(f"{folder}: drafter width {saved['layer']['hidden_size']} does not match the target's "
                         f"{drafter.layer_config.hidden_size}; it was trained for another target")
    missing, unexpected = drafter.load_state_dict(load_file(str(Path(folder) / "model.safetensors")), strict=False)
    if unexpected or [m for m in missing if not m.startswith("rotary.")]:
        raise ValueError(f"{folder}: weights do not fit (missing {missing}, unexpected {unexpected})")
    return drafter.to(target.device).eval()


class FeatureDraft:
    """A feature-level drafter (`models.feature_drafter.FeatureDrafter`) with the target's embedding and head.

    Its input at position t pairs the target feature f_t with the embedding of x_{t+1}; it predicts f_{t+1},
    which the target's head turns into the distribution of x_{t+2}. While drafting, predicted features stand in
    for the target's; the next step re-reads the true ones.
    """

    needs_features = True

    def __init__(self, drafter: torch.nn.Module, target: PreTrainedModel) -> None:
        self.drafter, self.target = drafter, target
        self.networks = (drafter,)  # what the decoder's few-row kernels apply to (models.kernels)
        self.embed, self.head = target.get_input_embeddings(), target.get_output_embeddings()

    def start(self, rows: int, capacity: int) -> None:
        config = self.drafter.layer_config
        parameter = next(self.drafter.parameters())
        self.cache = RaggedKVCache(1, rows, config.num_key_value_heads, config.hidden_size //
                                   config.num_attention_heads, capacity, parameter.dtype, parameter.device)
        self.lengths = [0] * rows  # pairs (f_t, x_{t+1}) held, t = 0 .. length-1
        self.predicted: torch.Tensor | None = None

    def _run(self, features: torch.Tensor, tokens: torch.Tensor, local: torch.Tensor, relative: torch.Tensor,
             offset: int) -> torch.Tensor:
        hidden = self.drafter.fused_inputs(features, self.embed(tokens))
        span = self.cache.begin([length + offset for length in self.lengths], tokens.shape[1])
        positions = torch.tensor(self.lengths, device=hidden.device)[:, None] + relative.to(hidden.device)[None, :]
        mask = block_mask(self.lengths, span, local, hidden.device)
        output = self.drafter.layer(hidden, attention_mask=mask, position_ids=positions,
                                    position_embeddings=self.drafter.rotary(hidden, positions),
                                    **cache_argument(self.drafter.layer, self.cache))
        self.predicted = output[0] if isinstance(output, tuple) else output
        return head_logits(self.target, self.predicted)

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
