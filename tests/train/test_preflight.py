"""The preflight catches, before any stage starts, a library that no longer fits our code (issue 11's break:
transformers 5.24 calling `cache.update(..., kwargs=...)` on our KV cache, found after 17 minutes of a run)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import transformers
from hydra import compose, initialize_config_dir
from packaging.version import Version

from models.cache import RaggedKVCache
from tests.conftest import REPO_ROOT
from train.pipeline.preflight import PreflightError, check_stages, tiny_like
from train.pipeline.runner import run

ALL_STAGES = ["data_gen", "pretrain", "distill", "eval", "export"]


def smoke_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO_ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["+experiment=smoke", "logger=none", f"runs_root={tmp_path / 'runs'}",
                                            f"cache_dir={tmp_path / 'cache'}", *overrides])


def test_every_stage_passes_preflight_with_the_installed_libraries(tiny_target):
    for feature_level in (False, True):
        seconds = check_stages(ALL_STAGES, tiny_target.model.config, feature_level=feature_level)
        print(f"preflight, feature_level={feature_level}: {seconds:.1f} s")
    check_stages(["data_gen"], tiny_target.model.config, data_gen_cache="static")


def test_tiny_copy_keeps_the_targets_architecture_and_vocabulary(real_target):
    tiny = tiny_like(real_target.model.config)
    assert type(tiny) is type(real_target.model)
    assert tiny.config.vocab_size == real_target.model.config.vocab_size
    assert tiny.config.num_hidden_layers == 2 and tiny.config.hidden_size == 64
    assert tiny.config.num_key_value_heads < tiny.config.num_attention_heads  # SmolLM2 uses grouped-query attention


def _update_without_extras(self, key, value, layer_idx, *, cache_position):
    """A cache whose update wants a keyword no transformers release passes: a signature mismatch on any version."""
    raise AssertionError("never reached")


def _update_as_before_the_fix(self, key, value, layer_idx, cache_kwargs=None):
    """RaggedKVCache.update as it was when transformers 5.24 broke the eval stage."""
    return ORIGINAL_UPDATE(self, key, value, layer_idx)


ORIGINAL_UPDATE = RaggedKVCache.update
BROKEN = [pytest.param(_update_without_extras, id="mismatched-signature"),
          pytest.param(_update_as_before_the_fix, id="issue-11-regression", marks=pytest.mark.skipif(
              Version(transformers.__version__).release < (5, 24),
              reason="the pre-fix signature broke only with transformers >= 5.24's update(..., kwargs=...)"))]


@pytest.mark.parametrize("update", BROKEN)
def test_an_incompatible_cache_stops_the_run_before_any_stage_starts(tmp_path, monkeypatch, update):
    monkeypatch.setattr(RaggedKVCache, "update", update)
    config = smoke_config(tmp_path)
    started = time.perf_counter()
    with pytest.raises(PreflightError) as caught:
        run(config)
    print(f"caught in {time.perf_counter() - started:.1f} s: {caught.value}")
    message = str(caught.value)
    assert "eval: TypeError" in message and update.__name__ in message
    assert "data_gen" not in message.split("installed:")[0]  # the stages that do not use our cache still pass
    assert "transformers " + transformers.__version__ in message and ".ci/setup" in message
    run_dir = tmp_path / "runs" / "smoke" / "default"
    started = [p.name for p in run_dir.iterdir() if p.name != ".locks"] if run_dir.exists() else []
    assert not started, "a stage started although preflight failed"


def test_preflight_false_skips_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(RaggedKVCache, "update", _update_without_extras)
    outputs = run(smoke_config(tmp_path, "preflight=false", "stages=[data_gen]", "data.limit=4"))
    assert (outputs["data_gen"] / "meta.json").exists()  # data_gen does not use the ragged cache
