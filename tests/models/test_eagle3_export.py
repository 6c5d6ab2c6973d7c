"""EAGLE-3 and speculators exports of a feature drafter (tiny target): the files hold what vLLM's EAGLE-3 loader
reads, an engine's reading of them computes the trained drafter's logits, a mistake in a field is caught, and a
drafter the format cannot express is refused by name. The same exports run in vLLM: tests/eval/test_serving_check.py."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from models import eagle3_export
from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter

SPEC = FeatureDrafterSpec(feature_layers=(1, 0), draft_vocab_size=96, layout="eagle3", seed=3)


@pytest.fixture
def drafter(tiny_target):
    model = tiny_target.model
    answers = [list(range(5, 200)), list(range(50, 120))]
    built = build_feature_drafter(SPEC, model, answers)
    with torch.no_grad():  # a trained-looking drafter: no weight left at its initial constant
        for parameter in built.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return built.eval()


@pytest.mark.parametrize("fmt", eagle3_export.FORMATS)
def test_the_export_holds_what_the_engine_reads_and_computes_the_drafters_logits(drafter, tiny_target, tmp_path,
                                                                                 fmt):
    config_in = tiny_target.model.config
    out = eagle3_export.write(drafter, config_in, tmp_path / fmt, fmt, 3, "TARGET_DIR", {"drafter": "test"})
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    layer = "midlayer." if fmt == "eagle3" else "layers.0."
    d = config_in.hidden_size
    assert weights[layer + "self_attn.q_proj.weight"].shape[1] == 2 * d
    assert not any(name.startswith("model.") or "embed_tokens" in name for name in weights)  # the target's is shared
    d2t = drafter.head.d2t
    assert torch.equal(weights["d2t"] + torch.arange(len(d2t)), d2t)  # offsets, as vLLM adds them
    assert weights["t2d"].sum() == len(d2t) and weights["t2d"][d2t].all()
    # feature_layers (1, 0) are outputs of layers 1 and 0 = the engines' inputs to layers 2 and 1, ascending
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2]
    assert torch.equal(weights["fc.weight"][:, :d], drafter.reduce.weight[:, d:])  # fc's blocks reordered with them
    fields = config if fmt == "eagle3" else config["transformer_layer_config"] | config
    assert fields["draft_vocab_size"] == 96 and fields["vocab_size"] == config_in.vocab_size
    assert fields["norm_before_residual"] is False  # the speculators route's default is True: written out
    if fmt == "eagle3":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
    else:
        assert config["speculators_model_type"] == "eagle3"
        assert config["speculators_config"]["proposal_methods"][0]["speculative_tokens"] == 3
        assert config["speculators_config"]["verifier"]["name_or_path"] == "TARGET_DIR"
    worst = eagle3_export.check_export(out, drafter, config_in.hidden_size)
    assert worst < 1e-4


@pytest.mark.parametrize("damage", ["norm_before_residual", "rope", "swapped_fc", "missing_norm", "d2t"])
def test_a_wrong_field_is_caught_before_anything_is_served(drafter, tiny_target, tmp_path, damage):
    out = eagle3_export.write(drafter, tiny_target.model.config, tmp_path / "x", "eagle3", 3, "T", {})
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    if damage == "norm_before_residual":
        config["norm_before_residual"] = True
    elif damage == "rope":
        config["rope_parameters"]["rope_theta"] *= 10
        config["rope_theta"] *= 10
    elif damage == "swapped_fc":  # the blocks in our order, not the engines' ascending one
        weights["fc.weight"] = drafter.reduce.weight.detach().clone()
    elif damage == "missing_norm":
        del weights["midlayer.hidden_norm.weight"]
    else:
        weights["d2t"] = torch.zeros_like(weights["d2t"])
    (out / "config.json").write_text(json.dumps(config))
    from safetensors.torch import save_file
    save_file(weights, str(out / "model.safetensors"))
    with pytest.raises(ValueError, match="engine|no tensor|vocabulary"):
        eagle3_export.check_export(out, drafter, tiny_target.model.config.hidden_size)


@pytest.mark.parametrize("spec, named", [
    (FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=96), "layout='linear'"),
    (FeatureDrafterSpec(layout="eagle3", draft_vocab_size=96), "feature_layers"),
    (FeatureDrafterSpec(feature_layers=(0, 1), layout="eagle3"), "draft_vocab_size"),
])
def test_a_drafter_the_format_cannot_express_is_refused_by_name(tiny_target, tmp_path, spec, named):
    built = build_feature_drafter(spec, tiny_target.model, [list(range(5, 200))])
    with pytest.raises(ValueError, match=named):
        eagle3_export.write(built, tiny_target.model.config, tmp_path / "x", "eagle3", 3, "T", {})
    assert not (tmp_path / "x").exists()
