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

    def forward(self, features: torch.Tensor, next_embeddings: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """Predicted next features [B, T, d] from target features f_t [B, T, d], embeddings of x_{t+1}
        [B, T, d] and a [B, T] padding mask (1 = real token)."""
        if self.spec.feature_sampling:
            features = features * next_embeddings
        hidden = self.fuse(torch.cat([features, next_embeddings], dim=-1))
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
