"""Feature drafters in the layouts serving engines load, EAGLE-3 and vLLM's speculators format: written, and read.

Both hold the same tensors (ANCHORS.md §6; vLLM 0.32's `llama_eagle3.py` reads them):

    fc.weight                  [d, k·d_target]   our `reduce`, its k blocks ordered by ascending target layer
    midlayer.* / layers.0.*    the EAGLE-3 decoder layer: q/k/v_proj [.., 2d], o_proj, mlp, input_layernorm (on the
                               embedding), hidden_norm (on the feature), post_attention_layernorm
    norm.weight, lm_head.weight  own norm and head over the draft vocabulary [N, d]
    d2t                        int64 offsets: target id = draft id + d2t[draft id];  t2d: bool [V], in the vocabulary

No embedding: the drafter reads the target's, which engines share when the checkpoint has none.

Engines number the target's auxiliary hidden states by the decoder layer they ENTER (vLLM: id i = the residual
stream before layer i), sorted ascending; draftsmith's `feature_layers` name the layer whose OUTPUT is taken. So our
layer L is the engines' id L + 1, and `fc`'s column blocks are permuted into ascending order.

What the formats cannot express is refused by name (`refusal`). What they can, `check_export` proves: it rebuilds
the drafter from the written files alone, reading each config field the way vLLM does (its defaults included), and
compares its logits and fed-back hidden states with our drafter's on the same inputs. vLLM loads a checkpoint that
misses a tensor without an error (the tensor stays uninitialised), so this check is the only one before serving.

`read_folder` goes the other way: any EAGLE-3 or speculators folder (ours, or another trainer's: speculators,
ModelOpt, SpecForge) becomes a `FeatureDrafter` that our decoder and eval run, built from the fields exactly as
vLLM reads them (its defaults for missing fields and layer ids included), so a peer's checkpoint is measured as
it will be served (an embed_tokens tensor in the folder included: vLLM embeds the drafter's tokens with it, and so
does the drafter read here). A tensor missing, left over or of the wrong shape is an error naming it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig

from infra.settings import SettingsError
from models.feature_drafter import FeatureDrafter, FeatureDrafterSpec
from models.loading import check_safetensors

FORMATS = ("eagle3", "speculators")
ARCHITECTURE = "LlamaForCausalLMEagle3"


def refusal(drafter: FeatureDrafter) -> str | None:
    """Why the engines' EAGLE-3 layout cannot hold this drafter (None when it can)."""
    spec = drafter.spec
    if spec.layout != "eagle3":
        return (f"drafter.layout={spec.layout!r}: its fc maps [f, e] to one d-wide input of a standard decoder layer, "
                f"while EAGLE-3 normalises e and f separately and feeds both (2d wide) to the attention. Train with "
                f"drafter.layout=eagle3 (conf/drafter/eagle3.yaml)")
    if not spec.feature_layers or len(spec.feature_layers) < 2:
        return ("the drafter reads the target's last hidden state (EAGLE-1); EAGLE-3 engines feed it an fc over "
                "several target layers. Set drafter.feature_layers (e.g. [2, 15, 27])")
    if not spec.draft_vocab_size:
        return ("the drafter drafts through the target's own head without a norm of its own; EAGLE-3 engines apply "
                "the drafter's norm and head. Set drafter.draft_vocab_size")
    if spec.feature_sampling:
        return "drafter.feature_sampling (FSPAD) has no field in the EAGLE-3 layout"
    return None


def engine_layer_ids(drafter: FeatureDrafter) -> list[int]:
    return sorted(layer + 1 for layer in drafter.spec.feature_layers)


def tensors(drafter: FeatureDrafter, layer_prefix: str) -> dict[str, torch.Tensor]:
    layers = drafter.spec.feature_layers
    order = sorted(range(len(layers)), key=lambda i: layers[i])
    fc = drafter.reduce.weight.detach()
    blocks = fc.shape[1] // len(layers)
    out = {"fc.weight": torch.cat([fc[:, i * blocks:(i + 1) * blocks] for i in order], 1)}
    if drafter.input_norm is not None:
        scale = drafter.input_norm.weight.detach()
        out["input_norm.weight"] = torch.cat([scale[i * blocks:(i + 1) * blocks] for i in order])
    for name, value in drafter.layer.state_dict().items():
        if "rotary" not in name:
            out[layer_prefix + name] = value.detach()
    out["norm.weight"] = drafter.norm.weight.detach()
    out["lm_head.weight"] = drafter.head.weight.detach()
    d2t = drafter.head.d2t.detach().long()
    out["d2t"] = d2t - torch.arange(len(d2t), device=d2t.device)
    t2d = torch.zeros(drafter.head.vocab_size, dtype=torch.bool, device=d2t.device)
    t2d[d2t] = True
    out["t2d"] = t2d
    return {k: v.cpu().contiguous() for k, v in out.items()}


def layer_config(drafter: FeatureDrafter, target_config) -> dict:
    """The Llama fields of the drafter's one layer, exactly what it was trained with (rope included)."""
    config = drafter.layer_config
    rope = dict(config.rope_parameters or {"rope_type": "default", "rope_theta": 10000.0})
    return {
        "model_type": "llama", "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.hidden_size // config.num_attention_heads, "num_hidden_layers": 1,
        "rms_norm_eps": config.rms_norm_eps, "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings, "rope_parameters": rope,
        "rope_theta": rope["rope_theta"], "vocab_size": target_config.vocab_size,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
        "bos_token_id": target_config.bos_token_id, "eos_token_id": target_config.eos_token_id,
        "torch_dtype": "float32", "num_aux_hidden_states": len(drafter.spec.feature_layers),
    }


def eagle_fields(drafter: FeatureDrafter, target_config) -> dict:
    spec = drafter.spec
    return {"draft_vocab_size": spec.draft_vocab_size, "target_hidden_size": target_config.hidden_size,
            "norm_before_residual": spec.norm_before_residual, "norm_before_fc": spec.norm_before_fc,
            "fc_norm": False, "norm_output": spec.norm_output,
            "eagle_aux_hidden_state_layer_ids": engine_layer_ids(drafter)}


def write(drafter: FeatureDrafter, target_config, out_dir: Path, fmt: str, gamma: int, verifier: str,
          provenance: dict) -> Path:
    """The drafter as `fmt` (eagle3 | speculators) in `out_dir`: config.json + model.safetensors."""
    problem = refusal(drafter)
    if problem:
        raise SettingsError(f"export.formats={fmt}: {problem}")
    out_dir.mkdir(parents=True, exist_ok=True)
    fields = eagle_fields(drafter, target_config)
    if fmt == "eagle3":
        config = {"architectures": [ARCHITECTURE], **layer_config(drafter, target_config), **fields,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": fields["eagle_aux_hidden_state_layer_ids"],
                                   "use_aux_hidden_state": True}}
        prefix = "midlayer."
    elif fmt == "speculators":
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                  "transformer_layer_config": layer_config(drafter, target_config), **fields,
                  "speculators_config": {
                      "algorithm": "eagle3", "default_proposal_method": "greedy",
                      "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma,
                                            "verifier_accept_k": 1, "accept_tolerance": 0.0}],
                      "verifier": {"name_or_path": verifier,
                                   "architectures": list(getattr(target_config, "architectures", None) or [])}}}
        prefix = "layers.0."
    else:
        raise ValueError(f"unknown engine format {fmt!r}; one of {FORMATS}")
    config["draftsmith"] = provenance
    save_file(tensors(drafter, prefix), str(out_dir / "model.safetensors"))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---- the engines' reading of the files, for check_export ----------------------------------------------------------

def _as_engine_reads(config: dict) -> dict:
    """The fields vLLM's EAGLE-3 Llama reads, with its defaults (llama_eagle3.py; the speculators route builds
    the layer config from `transformer_layer_config` and defaults norm_before_residual to True)."""
    if "speculators_config" in config:
        layer = dict(config["transformer_layer_config"])
        for key in ("draft_vocab_size", "target_hidden_size", "norm_before_fc", "fc_norm", "norm_output",
                    "eagle_aux_hidden_state_layer_ids"):
            if key in config:
                layer[key] = config[key]
        layer["norm_before_residual"] = config.get("norm_before_residual", True)
        config = layer
    eagle = config.get("eagle_config") or {}
    aux = config.get("num_aux_hidden_states") or len(eagle.get("eagle_aux_hidden_state_layer_ids") or ()) or 3
    heads = config["num_attention_heads"]
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return {"hidden": config["hidden_size"], "heads": heads, "kv_heads": config.get("num_key_value_heads", heads),
            "head_dim": config.get("head_dim") or config["hidden_size"] // heads, "eps": config["rms_norm_eps"],
            "theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "rope_type": rope.get("rope_type", rope.get("type", "default")), "vocab": config["vocab_size"],
            "draft_vocab": config.get("draft_vocab_size", config["vocab_size"]),
            "target_hidden": config.get("target_hidden_size") or config["hidden_size"], "aux": aux,
            "norm_before_residual": bool(config.get("norm_before_residual", False)),
            "norm_before_fc": bool(config.get("norm_before_fc", eagle.get("norm_before_fc", False))),
            "fc_norm": bool(config.get("fc_norm", False)), "norm_output": bool(config.get("norm_output", False)),
            "act": config.get("hidden_act", "silu")}


class EngineView:
    """The drafter as an engine builds it from `folder`'s files alone (single sequence, no cache)."""

    def __init__(self, folder: Path) -> None:
        self.c = _as_engine_reads(json.loads((folder / "config.json").read_text()))
        weights = load_file(str(folder / "model.safetensors"))
        self.w = {k.replace("midlayer.", "layers.0."): v.float() for k, v in weights.items() if k != "t2d"}
        c = self.c
        if c["fc_norm"] or c["rope_type"] != "default" or c["act"] != "silu":
            raise ValueError("EngineView reproduces EAGLE-3 Llama drafters with default rope, silu and no fc_norm")
        expected = {"fc.weight": (c["hidden"], c["aux"] * c["target_hidden"]),
                    "layers.0.self_attn.q_proj.weight": (c["heads"] * c["head_dim"], 2 * c["hidden"]),
                    "layers.0.self_attn.k_proj.weight": (c["kv_heads"] * c["head_dim"], 2 * c["hidden"]),
                    "layers.0.self_attn.v_proj.weight": (c["kv_heads"] * c["head_dim"], 2 * c["hidden"]),
                    "layers.0.self_attn.o_proj.weight": (c["hidden"], c["heads"] * c["head_dim"]),
                    "layers.0.input_layernorm.weight": (c["hidden"],),
                    "layers.0.hidden_norm.weight": (c["hidden"],),
                    "layers.0.post_attention_layernorm.weight": (c["hidden"],),
                    "norm.weight": (c["hidden"],), "lm_head.weight": (c["draft_vocab"], c["hidden"])}
        if c["draft_vocab"] != c["vocab"]:
            expected["d2t"] = (c["draft_vocab"],)
        if c["norm_before_fc"]:
            expected["input_norm.weight"] = (c["aux"] * c["target_hidden"],)
        for name, shape in expected.items():
            if name not in self.w:
                raise ValueError(f"{folder}: no tensor {name!r} (an engine would leave it uninitialised)")
            if tuple(self.w[name].shape) != shape:
                raise ValueError(f"{folder}: {name} has shape {tuple(self.w[name].shape)}, the config implies {shape}")

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.c["eps"]) * self.w[name]

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        dim = x.shape[-1]
        inv = 1.0 / self.c["theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
        angles = positions.float()[:, None] * inv[None, :]
        cos, sin = torch.cat([angles, angles], -1).cos()[None], torch.cat([angles, angles], -1).sin()[None]
        half = dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * cos + rotated * sin

    def combine(self, aux_ascending: torch.Tensor) -> torch.Tensor:
        if self.c["norm_before_fc"]:
            aux_ascending = self._norm(aux_ascending, "input_norm.weight")
        return aux_ascending @ self.w["fc.weight"].T

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor):
        """(logits over the target vocabulary, the hidden state fed back) for one sequence [T, d]."""
        c, w, p = self.c, self.w, "layers.0."
        if c["norm_before_residual"]:
            hidden = self._norm(hidden, p + "hidden_norm.weight")
            residual, normed = hidden, hidden
        else:
            residual, normed = hidden, self._norm(hidden, p + "hidden_norm.weight")
        x = torch.cat([self._norm(embeds, p + "input_layernorm.weight"), normed], -1)
        T = x.shape[0]
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(T, c["heads"], c["head_dim"]).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(T, c["kv_heads"], c["head_dim"]).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, c["kv_heads"], c["head_dim"]).transpose(0, 1)
        q, k = self._rope(q, positions), self._rope(k, positions)
        repeat = c["heads"] // c["kv_heads"]
        k, v = k.repeat_interleave(repeat, 0), v.repeat_interleave(repeat, 0)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(c["head_dim"])
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        attended = (scores.softmax(-1) @ v).transpose(0, 1).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        residual = residual + attended
        h = self._norm(residual, p + "post_attention_layernorm.weight")
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        prenorm = residual + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
        normed_out = self._norm(prenorm, "norm.weight")
        small = normed_out @ w["lm_head.weight"].T
        logits = small.new_full((T, c["vocab"]), float("-inf"))
        if "d2t" in w:
            logits[:, torch.arange(c["draft_vocab"]) + w["d2t"].long()] = small
        else:
            logits = small
        return logits, (normed_out if c["norm_output"] else prenorm)


def check_export(folder: Path, drafter: FeatureDrafter, target_hidden: int, tokens: int = 12, seed: int = 0,
                 tolerance: float = 1e-3) -> float:
    """Largest difference between the engine's reading of `folder` and `drafter` on random features: the logits
    of a first pass (target features) and of a second pass (fed its own hidden states). Raises beyond `tolerance`."""
    view = EngineView(folder)
    generator = torch.Generator().manual_seed(seed)
    layers = drafter.spec.feature_layers
    d = drafter.layer_config.hidden_size
    ours_aux = torch.randn(1, tokens, len(layers) * target_hidden, generator=generator)
    embeds = torch.randn(1, tokens, d, generator=generator) * 0.05
    positions = torch.arange(tokens)
    blocks = ours_aux.view(1, tokens, len(layers), target_hidden)
    ascending = blocks[:, :, sorted(range(len(layers)), key=lambda i: layers[i])].reshape(1, tokens, -1)
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
    parameter = next(drafter.parameters())
    worst = 0.0
    with torch.no_grad():
        ours_in, engine_in = ours_aux, view.combine(ascending[0])
        for step in range(2):
            ours_out = drafter.step(ours_in.to(parameter), embeds.to(parameter), mask.to(parameter.device),
                                    positions[None].to(parameter.device)).float().cpu()
            ours_logits = drafter.logits(ours_out.to(parameter), None).float().cpu()[0]
            engine_logits, engine_hidden = view.forward(embeds[0], engine_in, positions)
            finite = torch.isfinite(ours_logits)
            if not torch.equal(finite, torch.isfinite(engine_logits)):
                raise ValueError(f"{folder}: the engine's draft vocabulary differs from the drafter's (d2t)")
            worst = max(worst, (ours_logits[finite] - engine_logits[finite]).abs().max().item(),
                        (ours_out[0] - engine_hidden).abs().max().item())
            if worst > tolerance:
                raise ValueError(f"{folder}: an engine reading this export computes other logits than the drafter "
                                 f"(pass {step + 1}: max |difference| {worst:.2e} > {tolerance}); not exported")
            ours_in, engine_in = ours_out, engine_hidden
    return worst


# ---- reading an engine folder (ours or a peer's) into a FeatureDrafter -------------------------------------------

def is_engine_folder(folder: Path) -> bool:
    """Whether `folder` holds an EAGLE-3 drafter in the EAGLE-3 or speculators layout."""
    path = Path(folder) / "config.json"
    if not path.exists():
        return False
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    return (config.get("speculators_model_type") == "eagle3"
            or any("Eagle3" in name for name in config.get("architectures") or []))


def served_layer_ids(config: dict, target_layers: int) -> list[int]:
    """The target layers vLLM feeds the drafter, in its numbering (id i = the residual stream entering layer i):
    the folder's ids, else vLLM's default for a Llama-like target (2, n // 2, n - 3), in ascending order."""
    eagle = config.get("eagle_config") or {}
    ids = config.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
    return sorted(ids) if ids else [2, target_layers // 2, target_layers - 3]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}: no *.safetensors file (an engine folder holds its weights there)")
    weights = {}
    for path in files:
        check_safetensors(path)
        weights |= load_file(str(path))
    return weights


def _file_name(ours: str) -> str:
    """The engines' name (speculators layout) of one of our drafter's tensors."""
    renamed = {"reduce.weight": "fc.weight", "head.weight": "lm_head.weight", "head.d2t": "d2t",
               "embed_tokens.weight": "embed_tokens.weight"}
    return renamed.get(ours) or ("layers.0." + ours.removeprefix("layer.") if ours.startswith("layer.") else ours)


def read_folder(folder: Path, target, layer_ids: list[int] | None = None) -> FeatureDrafter:
    """The drafter in `folder` (EAGLE-3 or speculators layout) for `target` (a transformers model), as vLLM would
    build it. `layer_ids` (engine numbering) replaces the folder's own: to decode a checkpoint with the layers it
    was trained on where its export names others."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    c = _as_engine_reads(config)
    target_config = target.config
    if c["fc_norm"]:
        raise ValueError(f"{folder}: fc_norm (one norm per target layer before fc) is not a drafter option here")
    if c["act"] != "silu":
        raise ValueError(f"{folder}: hidden_act {c['act']!r}; the EAGLE-3 Llama layer here uses silu")
    if c["rope_type"] != "default":
        raise ValueError(f"{folder}: rope {c['rope_type']!r} (config.json rope_parameters/rope_scaling); the EAGLE-3 "
                         f"Llama layer here computes the default rope only, so it would not decode what an engine "
                         f"serves")
    if c["target_hidden"] != target_config.hidden_size or c["vocab"] != target_config.vocab_size:
        raise ValueError(f"{folder}: a drafter for a target {c['target_hidden']} wide with {c['vocab']} tokens; "
                         f"this target is {target_config.hidden_size} wide with {target_config.vocab_size}")
    ids = sorted(layer_ids) if layer_ids else served_layer_ids(config, target_config.num_hidden_layers)
    if len(ids) != c["aux"]:
        raise ValueError(f"{folder}: {len(ids)} aux layer ids {ids} for a fc over {c['aux']} target layers")
    if not all(1 <= i <= target_config.num_hidden_layers for i in ids):
        raise ValueError(f"{folder}: aux layer ids {ids} name layers outside 1..{target_config.num_hidden_layers} "
                         f"(id 0, the embedding, is not a feature here)")
    weights = {k.replace("midlayer.", "layers.0."): v.float() for k, v in _weights(folder).items() if k != "t2d"}
    if "embed_tokens.weight" in weights:  # vLLM then embeds the drafter's tokens with it, not the target's
        shape = tuple(weights["embed_tokens.weight"].shape)
        if shape != (c["vocab"], c["hidden"]):
            raise ValueError(f"{folder}: embed_tokens.weight has shape {shape}, the config implies "
                             f"{(c['vocab'], c['hidden'])}")
    layer_fields = config.get("transformer_layer_config") or config
    rope = dict(layer_fields.get("rope_parameters") or {"rope_type": "default", "rope_theta": c["theta"]})
    layer_config = LlamaConfig(
        hidden_size=c["hidden"], intermediate_size=layer_fields["intermediate_size"],
        num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"],
        num_hidden_layers=1, max_position_embeddings=layer_fields.get("max_position_embeddings", 2048),
        rms_norm_eps=c["eps"], vocab_size=c["vocab"], rope_parameters=rope, hidden_act=c["act"])
    spec = FeatureDrafterSpec(name=folder.name, intermediate_size=layer_fields["intermediate_size"],
                              feature_layers=tuple(i - 1 for i in ids), draft_vocab_size=c["draft_vocab"],
                              layout="eagle3", norm_before_fc=c["norm_before_fc"],
                              norm_before_residual=c["norm_before_residual"], norm_output=c["norm_output"],
                              own_embedding="embed_tokens.weight" in weights)
    drafter = FeatureDrafter(spec, target_config, layer_config)
    offsets = weights.pop("d2t", None)
    if offsets is None and c["draft_vocab"] != c["vocab"]:
        raise ValueError(f"{folder}: a draft vocabulary of {c['draft_vocab']} tokens with no d2t tensor")
    d2t = torch.arange(c["draft_vocab"]) + (offsets.long() if offsets is not None else 0)
    expected = {k: v.shape for k, v in drafter.state_dict().items() if not k.startswith("rotary.")}
    state = {"head.d2t": d2t} | {ours: weights.pop(theirs) for ours, theirs in
                                 ((k, _file_name(k)) for k in expected) if theirs in weights}
    missing = sorted(_file_name(k) for k in expected if k not in state)
    if missing or weights:
        raise ValueError(f"{folder}: the weights do not make the drafter its config describes (missing {missing}, "
                         f"left over {sorted(weights)}); an engine would serve it partly uninitialised")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ValueError(f"{folder}: {_file_name(name)} has shape {tuple(state[name].shape)}, the config "
                             f"implies {tuple(shape)}")
    drafter.load_state_dict(state, strict=False)
    return drafter.to(target.device).eval()
