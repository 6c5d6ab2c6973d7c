"""Seconds-long checks, before a run's first long stage, that every stage it will run can run here.

A library release that changes an internal draftsmith relies on (how attention calls our KV cache, the 4D mask
path, fused AdamW, a decoder layer's arguments) should stop a run in its first seconds, not after the data_gen
and training stages have spent an hour. Each check runs the stage's own code on a tiny random model of the
target's architecture (2 layers, width 64: no weights are read), and compares what it decodes with a reference
that uses no cache at all, so a silent change is caught as well as a crash:

- data_gen (hf backend): the backend's batched decode loop with the configured cache (dynamic or static);
  (vllm backend): vLLM imports.
- pretrain, distill: one forward under a 4D mask, backward and fused-AdamW step of a tiny drafter (and of a
  feature-level drafter when one is configured); with DeepSpeed, it imports.
- eval: speculative decoding (chain and tree) through the ragged KV cache equals plain decoding and the
  cache-free reference, token for token.
- export: a drafter saved, exported and loaded back with transformers.
- online: the training and eval checks.

Which checks a stage needs is its `checks` in the stage table (`train/pipeline/stages.py`). The runner
(`train/pipeline/runner.py`) calls `check_run` (turn off with `preflight=false`); a failure raises `PreflightError`,
naming each stage that cannot run, why, the installed library versions and what to do.
"""
from __future__ import annotations

import copy
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from models.compat import version_checks
from models.feature_drafter import FeatureDrafter, FeatureDrafterSpec
from models.kinds import kind_of_spec
from models.loading import TargetSpec, resolve_model_dir
from models.tiny import spread_weights
from train.pipeline.stages import DISTRIBUTED_STAGES, STAGES

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}


class PreflightError(RuntimeError):
    """A stage of this run cannot run with the installed libraries."""


def tiny_like(config: PretrainedConfig) -> torch.nn.Module:
    """A random 2-layer, width-64 model of the target's own architecture class and vocabulary."""
    tiny = copy.deepcopy(config)
    for key, value in TINY.items():
        setattr(tiny, key, value)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None)
    if kv_heads is not None:
        tiny.num_key_value_heads = TINY["num_attention_heads"] // 2 if kv_heads < heads else TINY["num_attention_heads"]
    if getattr(config, "head_dim", None) is not None:
        tiny.head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    if getattr(config, "layer_types", None):
        tiny.layer_types = list(config.layer_types)[: TINY["num_hidden_layers"]]
    return spread_weights(AutoModelForCausalLM.from_config(tiny, dtype=torch.float32)).eval()


def reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy continuation recomputed from scratch at every step: no cache, nothing to go wrong."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = model(input_ids=torch.tensor([tokens]), use_cache=False).logits[0, -1]
            tokens.append(int(logits.argmax()))
    return tokens[len(prompt):]


PROMPTS = [[5, 9, 2, 7, 11, 3], [8, 1, 4]]
NEW_TOKENS = 6


def _expect(what: str, got, want) -> None:
    if got != want:
        raise AssertionError(f"{what}: {got} != the cache-free reference {want}")


def check_data_gen_hf(target, cache: str) -> None:
    from data_gen.backends import HFBackend, Request
    from models.sampling import SamplingSettings

    backend = HFBackend(target, pad_id=0, stop_ids=[], sampling=SamplingSettings(), max_new_tokens=NEW_TOKENS,
                        batch_size=len(PROMPTS), cache=cache, progress=False)
    completions = backend.generate([Request(str(i), p, i) for i, p in enumerate(PROMPTS)])
    for prompt, completion in zip(PROMPTS, completions):
        _expect(f"data_gen's hf backend (cache={cache})", completion.token_ids, reference_greedy(target, prompt,
                                                                                                 NEW_TOKENS))


def check_vllm_import() -> None:
    import vllm  # noqa: F401  # pyflakes: the engine itself starts in the stage; a failing import fails here


def _one_step(model: torch.nn.Module, loss_fn) -> None:
    from train.core.optim import OptimSettings, build_optimizer

    optimizer, _ = build_optimizer(model, OptimSettings(warmup_steps=1), total_steps=1)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    model.train()
    loss = loss_fn()
    if not torch.isfinite(loss):
        raise AssertionError(f"the training loss of a tiny random model is {loss.item()}")
    loss.backward()
    optimizer.step()
    after = [p for p in model.parameters() if p.requires_grad]
    if all(torch.equal(a, b) for a, b in zip(before, after)):
        raise AssertionError("one optimizer step changed no parameter")


def check_training(target, feature_level: bool) -> None:
    """One step of a tiny token drafter under a block-diagonal 4D mask (pretrain's packed documents); with a
    feature-level drafter, one step of it over the tiny target's features."""
    drafter = tiny_like(target.config)
    tokens = torch.tensor([PROMPTS[0] + PROMPTS[1] + [6, 2, 9]])
    width = tokens.shape[1]
    document = torch.tensor([0] * len(PROMPTS[0]) + [1] * (width - len(PROMPTS[0])))
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = (causal & (document[:, None] == document[None, :]))[None, None]
    positions = torch.cat([torch.arange(len(PROMPTS[0])), torch.arange(width - len(PROMPTS[0]))])[None]

    def token_loss():
        logits = drafter(input_ids=tokens, attention_mask=mask, position_ids=positions).logits
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), tokens[0, 1:])
    _one_step(drafter, token_loss)
    if feature_level:
        features_drafter = FeatureDrafter(FeatureDrafterSpec(feature_sampling=True), target.config)
        with torch.no_grad():
            features = target.get_decoder()(input_ids=tokens).last_hidden_state
            embeddings = target.get_input_embeddings()(tokens)

        def feature_loss():
            predicted = features_drafter(features[:, :-1], embeddings[:, 1:], torch.ones(1, width - 1))
            return torch.nn.functional.smooth_l1_loss(predicted, features[:, 1:])
        _one_step(features_drafter, feature_loss)


def check_eval(target, feature_level: bool) -> None:
    from eval.decoder import DecodeSettings, plain_generate, speculative_generate
    from models.drafter import TokenDraft
    from models.feature_drafter import FeatureDraft

    drafts = {"token-level": TokenDraft(tiny_like(target.config))}
    if feature_level:
        drafts["feature-level"] = FeatureDraft(FeatureDrafter(FeatureDrafterSpec(), target.config).eval(), target)
    want = [reference_greedy(target, prompt, NEW_TOKENS) for prompt in PROMPTS]
    for batch_size in (1, 2):
        settings = DecodeSettings(gamma=2, max_new_tokens=NEW_TOKENS, batch_size=batch_size)
        _expect(f"plain decoding on the ragged cache (batch {batch_size})",
                plain_generate(target, PROMPTS, settings, stop_ids=[]), want)
        for name, draft in drafts.items():
            for label, decode in (("chain", settings), ("tree", DecodeSettings(
                    tree=(2, 1), max_new_tokens=NEW_TOKENS, batch_size=batch_size))):
                got = [g.tokens for g in speculative_generate(target, draft, PROMPTS, decode, stop_ids=[])]
                _expect(f"speculative decoding ({label}, {name} drafter, batch {batch_size})", got, want)


def check_export(target) -> None:
    from transformers.utils import logging as hf_logging

    from models.export import export_drafter

    drafter = tiny_like(target.config)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny model's save and load bars would only clutter the run's output
    try:
        with tempfile.TemporaryDirectory() as folder:
            saved = Path(folder) / "drafter"
            drafter.save_pretrained(saved, safe_serialization=True)
            exported = export_drafter(saved, Path(folder) / "export", card="# preflight\n", target_dir=None)
            loaded = AutoModelForCausalLM.from_pretrained(exported, use_safetensors=True)
            probe = torch.tensor([PROMPTS[0]])
            with torch.no_grad():
                if not torch.allclose(loaded(input_ids=probe).logits, drafter(input_ids=probe).logits, atol=1e-5):
                    raise AssertionError("the exported drafter, loaded back, computes other logits")
    finally:
        if bars:
            hf_logging.enable_progress_bar()

def check_stages(stages: list[str], target_config: PretrainedConfig, *, data_gen_backend: str = "hf",
                 data_gen_cache: str = "dynamic", feature_level: bool = False, deepspeed: bool = False) -> float:
    """Run the checks `stages` need; returns the seconds taken, or raises PreflightError naming every failure."""
    started = time.perf_counter()
    checks = {}
    with torch.random.fork_rng(devices=[]):  # training and sampling seeds stay exactly as they would be
        torch.manual_seed(0)
        target = tiny_like(target_config)
        needed = {check for stage in stages for check in STAGES[stage].checks}  # the stage table's `checks`
        if "data_gen" in needed:
            checks["data_gen"] = (check_vllm_import if data_gen_backend == "vllm"
                                  else lambda: check_data_gen_hf(target, data_gen_cache))
        if "training" in needed:
            checks["training"] = lambda: check_training(target, feature_level)
            if deepspeed and set(stages) & set(DISTRIBUTED_STAGES):
                checks["deepspeed"] = lambda: __import__("deepspeed")
        if "eval" in needed:
            checks["eval"] = lambda: check_eval(target, feature_level)
        if "export" in needed:
            checks["export"] = lambda: check_export(target)
        failures = {}
        for name, check in checks.items():
            try:
                check()
            except Exception as error:  # noqa: BLE001  every failure is reported, with where it happened
                where = traceback.extract_tb(error.__traceback__)[-1]
                failures[name] = f"{type(error).__name__}: {error} ({where.filename}:{where.lineno})"
    if failures:
        versions = ", ".join(f"{row.package} {row.installed}" for row in version_checks() if row.installed)
        raise PreflightError(
            "preflight: these parts of the run cannot work with the installed libraries, so nothing was started:\n"
            + "\n".join(f"  {name}: {why}" for name, why in failures.items())
            + f"\n  installed: {versions}\n  Run .ci/setup to install the versions the suite passed with "
              f"(.ci/lock.txt); `python -m models.compat` compares them with the tested ranges.")
    return time.perf_counter() - started


def check_run(stages: list[str], target: TargetSpec, cache_dir: Path, *, data_gen, drafter, deepspeed) -> float:
    """`check_stages` for a configured run (the typed data_gen, drafter and deepspeed sections)."""
    model_dir, _ = resolve_model_dir(target, cache_dir)
    return check_stages(stages, AutoConfig.from_pretrained(model_dir, trust_remote_code=target.trust_remote_code),
                        data_gen_backend=data_gen.backend, data_gen_cache=data_gen.cache,
                        feature_level=kind_of_spec(drafter).training == "features", deepspeed=deepspeed.enabled)
