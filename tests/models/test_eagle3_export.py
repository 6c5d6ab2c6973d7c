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


def built_drafter(target):
    answers = [list(range(5, 200)), list(range(50, 120))]
    built = build_feature_drafter(SPEC, target.model, answers)
    with torch.no_grad():  # a trained-looking drafter: no weight left at its initial constant
        for parameter in built.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return built.eval()


@pytest.fixture
def drafter(tiny_target):
    return built_drafter(tiny_target)


@pytest.mark.parametrize("fmt", eagle3_export.FORMATS)
def test_the_export_holds_what_the_engine_reads_and_computes_the_drafters_logits(family_target, tmp_path, fmt):
    """In every family (`family_target`)."""
    drafter = built_drafter(family_target)
    config_in = family_target.model.config
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


NORMS = [dict(norm_before_fc=True), dict(norm_before_residual=True), dict(norm_output=True),
         dict(norm_before_fc=True, norm_before_residual=True, norm_output=True)]


def perturbed(spec, model):
    built = build_feature_drafter(spec, model, [list(range(5, 200)), list(range(50, 120))])
    with torch.no_grad():
        for parameter in built.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return built.eval()


def same_drafts(a, b, model, tokens: int = 9) -> float:
    """Largest logit difference of two feature drafters over a first pass on the target's features (each
    drafter's layers in its own order) and a second fed their own outputs (what drafting does)."""
    generator = torch.Generator().manual_seed(5)
    d = model.config.hidden_size
    layers = {layer: torch.randn(1, tokens, d, generator=generator) for layer in sorted(a.spec.feature_layers)}
    embeds = torch.randn(1, tokens, d, generator=generator) * 0.05
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None]
    positions = torch.arange(tokens)[None]
    worst = 0.0
    inputs = [torch.cat([layers[layer] for layer in drafter.spec.feature_layers], -1) for drafter in (a, b)]
    with torch.no_grad():
        for _ in range(2):
            outs = [drafter.step(x, embeds, mask, positions) for drafter, x in zip((a, b), inputs)]
            logits = [drafter.logits(out, model) for drafter, out in zip((a, b), outs)]
            finite = torch.isfinite(logits[0])
            assert torch.equal(finite, torch.isfinite(logits[1]))
            worst = max(worst, (logits[0][finite] - logits[1][finite]).abs().max().item())
            inputs = outs
    return worst


@pytest.mark.parametrize("norms", NORMS, ids=lambda n: "+".join(n))
@pytest.mark.parametrize("fmt", eagle3_export.FORMATS)
def test_the_engines_norm_options_export_and_read_back_exactly(tiny_target, tmp_path, norms, fmt):
    """norm_before_fc / norm_before_residual / norm_output (speculators' Eagle-3.1 family): each changes what the
    drafter computes, the export writes it where vLLM reads it, and read_folder rebuilds the same drafter."""
    model = tiny_target.model
    plain, normed = perturbed(SPEC, model), perturbed(FeatureDrafterSpec(**{**vars(SPEC), **norms}), model)
    assert same_drafts(plain, normed, model) > 1e-3  # the option is not a no-op
    out = eagle3_export.write(normed, model.config, tmp_path / fmt, fmt, 3, "T", {})
    config = json.loads((out / "config.json").read_text())
    for name, value in norms.items():
        assert config[name] is value
    assert ("input_norm.weight" in load_file(str(out / "model.safetensors"))) == norms.get("norm_before_fc", False)
    assert eagle3_export.check_export(out, normed, model.config.hidden_size) < 1e-4
    read = eagle3_export.read_folder(out, model)
    assert read.spec.feature_layers == (0, 1)  # engine ids [1, 2], ascending
    assert {k: getattr(read.spec, k) for k in norms} == norms
    assert same_drafts(normed, read, model) < 1e-5


def test_our_saved_drafter_keeps_its_norm_options(tiny_target, tmp_path):
    from models.feature_drafter import load_feature_drafter

    model = tiny_target.model
    drafter = perturbed(FeatureDrafterSpec(**{**vars(SPEC), **NORMS[-1]}), model)
    loaded = load_feature_drafter(drafter.save(tmp_path / "saved"), model)
    assert same_drafts(drafter, loaded, model) == 0.0


def test_an_engine_folder_is_a_drafter_the_eval_loads_and_decodes_losslessly(family_target, tmp_path):
    """A folder in the speculators layout (any trainer's) loads through the kinds like our own drafters, and
    speculative decoding with it gives plain greedy's tokens, in every family."""
    from data_gen.chat import end_of_turn_ids
    from eval.decoder import DecodeSettings, plain_generate, speculative_generate
    from models.kinds import FeatureKind, draft_for, kind_of_folder, load_any

    drafter = built_drafter(family_target)
    model, tokenizer = family_target.model, family_target.tokenizer
    out = eagle3_export.write(drafter, model.config, tmp_path / "peer", "speculators", 3, "T", {})
    assert isinstance(kind_of_folder(out), FeatureKind)
    loaded = load_any(out, family_target)
    assert same_drafts(drafter, loaded, model) < 1e-5
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    prompts = [tokenizer.encode(text) for text in ("hello there, how", "the cat sat on the mat and")]
    reference = plain_generate(model, prompts, DecodeSettings(max_new_tokens=24), stop_ids)
    generations = speculative_generate(model, draft_for(loaded, model), prompts,
                                       DecodeSettings(gamma=3, max_new_tokens=24), stop_ids)
    assert [g.tokens for g in generations] == reference


def _rewrite(out, config=None, weights=None):
    from safetensors.torch import save_file

    if config is not None:
        (out / "config.json").write_text(json.dumps(config))
    if weights is not None:
        save_file(weights, str(out / "model.safetensors"))


@pytest.mark.parametrize("damage, named", [
    ("missing_tensor", r"missing \['layers.0.hidden_norm.weight'\]"),
    ("extra_tensor", r"left over \['layers.0.stray.weight'\]"),
    ("embedding_shape", r"embed_tokens.weight has shape \(256, 64\)"),
    ("wrong_target", "this target is 64 wide"),
    ("layer_ids", "outside 1..2"),
    ("no_d2t", "no d2t"),
])
def test_a_folder_that_does_not_make_its_drafter_is_refused_by_name(drafter, tiny_target, tmp_path, damage, named):
    model = tiny_target.model
    out = eagle3_export.write(drafter, model.config, tmp_path / "peer", "speculators", 3, "T", {})
    config = json.loads((out / "config.json").read_text())
    weights = load_file(str(out / "model.safetensors"))
    if damage == "missing_tensor":
        del weights["layers.0.hidden_norm.weight"]
    elif damage == "extra_tensor":
        weights["layers.0.stray.weight"] = torch.zeros(3)
    elif damage == "embedding_shape":
        weights["embed_tokens.weight"] = model.get_input_embeddings().weight.detach()[:256]
    elif damage == "wrong_target":
        config["target_hidden_size"] = 128
    elif damage == "layer_ids":
        config["eagle_aux_hidden_state_layer_ids"] = [0, 2]
    else:
        del weights["d2t"]
    _rewrite(out, config, weights)
    with pytest.raises(ValueError, match=named):
        eagle3_export.read_folder(out, model)


def test_a_folders_own_embedding_is_what_the_drafter_embeds_with_and_layer_ids_follow_vllm(drafter, tiny_target,
                                                                                           tmp_path):
    """speculators saves a bf16 copy of the target's embedding; vLLM embeds the drafter's tokens with it, so the
    drafter read here does too. Without layer ids in the folder, vLLM's default ids apply."""
    from models.feature_drafter import FeatureDraft

    model = tiny_target.model
    out = eagle3_export.write(drafter, model.config, tmp_path / "peer", "speculators", 3, "T", {})
    weights = load_file(str(out / "model.safetensors"))
    rounded = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    weights["embed_tokens.weight"] = rounded
    config = json.loads((out / "config.json").read_text())
    del config["eagle_aux_hidden_state_layer_ids"]
    config["target_hidden_size"] = None  # as speculators writes it: vLLM then takes the drafter's width
    _rewrite(out, config, weights)
    assert eagle3_export.served_layer_ids(config, 30) == [2, 15, 27]  # vLLM's default for a 30-layer target
    with pytest.raises(ValueError, match="aux layer ids"):  # that default does not fit a 2-layer target
        eagle3_export.read_folder(out, model)
    read = eagle3_export.read_folder(out, model, layer_ids=[2, 1])  # as trained, where the export says otherwise
    assert read.spec.feature_layers == (0, 1) and read.spec.own_embedding
    assert torch.equal(FeatureDraft(read, model).embed.weight, rounded.float())
    from models.drafter import count_parameters
    from models.kinds import FeatureKind
    assert FeatureKind().parameters_per_token(read, model) == count_parameters(drafter)  # a lookup is not read
    assert same_drafts(drafter, read, model) < 1e-5  # same_drafts feeds embeddings directly: the layers agree


@pytest.mark.parametrize("fmt", eagle3_export.FORMATS)
def test_an_export_folder_is_an_eval_drafter_read_by_its_format(tiny_target, tmp_path, fmt):
    """`+eval.drafters.NAME=<export>/drafter-eagle3` (or -speculators): the folder is recognised by its format, a
    feature drafter (not a token drafter because it has a config.json), and decodes as the drafter it was written
    from: the same tokens, the same acceptance at every step, equal to plain decoding."""
    from eval.decoder import DecodeSettings, plain_generate, speculative_generate
    from models.kinds import draft_for, kind_of_folder, load_any

    model = tiny_target.model
    drafter = perturbed(SPEC, model)
    out = eagle3_export.write(drafter, model.config, tmp_path / fmt, fmt, 3, "T", {})
    assert kind_of_folder(out).name == "feature"
    read = load_any(out, tiny_target)
    prompts, settings = [list(range(5, 40)), list(range(60, 75))], DecodeSettings(gamma=3, max_new_tokens=24)
    ours = speculative_generate(model, draft_for(drafter, model), prompts, settings, [])
    exported = speculative_generate(model, draft_for(read, model), prompts, settings, [])
    assert [g.tokens for g in ours] == [g.tokens for g in exported] == plain_generate(model, prompts, settings, [])
    assert [g.stats.metrics() for g in ours] == [g.stats.metrics() for g in exported]
