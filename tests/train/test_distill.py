"""Stage distill on the tiny target: every loss config trains, teachers online/offline agree, on-policy rows are the
drafter's own answers, accumulation does not change the step, LoRA saves plain weights, NaN stops training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from data_gen.generate import GenerationSettings, generate
from data_gen.sources import Conversation
from losses.ce import cross_entropy
from losses.kl import forward_kl
from losses.mix import LossMix
from models.drafter import DrafterSpec, LoraSettings, build_drafter, load_drafter
from tests.conftest import TINY_PROMPTS, quiet_tracker
from train.core.optim import OptimSettings
from train.core.rows import Row, collate, offline_teacher_logits, read_rows
from train.distill import DistillSettings, OnPolicySettings, distill, on_policy_rows

SPEC = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
LOSS_CONFIGS = [path for path in sorted((Path(__file__).resolve().parents[2] / "conf" / "loss").glob("*.yaml"))
                if OmegaConf.load(path)._target_ == "losses.mix.LossMix"]  # eagle/fspad: tests/train/test_feature_distill.py
FKL = LossMix({"fkl": {"fn": forward_kl, "weight": 1.0}})


def run(tiny_target, records_dir, out, loss=FKL, extra_rows=None, **overrides):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    settings = DistillSettings(**{"epochs": 4, "batch_size": 2, "heldout_records": 2, "log_every": 1,
                                  "optim": OptimSettings(lr=1e-2, warmup_steps=2)} | overrides)
    drafter = build_drafter(SPEC, model, tokenizer)
    summary = distill(drafter, model, tokenizer, records_dir, loss, settings, out, quiet_tracker(out),
                      stop_ids=[tokenizer.eos_token_id], extra_rows=extra_rows)
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    return summary, curve


def test_collate_marks_positions_whose_next_token_is_response():
    rows = [Row(id="a", input_ids=[5, 6, 7, 8], loss_mask=[0, 0, 1, 1], prompt_ids=[5, 6]),
            Row(id="b", input_ids=[9, 10], loss_mask=[0, 1], prompt_ids=[9])]
    input_ids, attention, positions, labels = collate(rows, pad_id=0, max_seq_len=16, device=torch.device("cpu"))
    assert input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert positions.tolist() == [[False, True, True, False], [True, False, False, False]]
    assert labels[positions].tolist() == [7, 8, 10]


def test_distill_lowers_the_loss_raises_the_proxy_and_selects_the_best(tiny_target, records_dir, tmp_path):
    summary, curve = run(tiny_target, records_dir, tmp_path, epochs=12)
    losses = [entry["loss"] for entry in curve]
    assert len(curve) == summary["steps"] == 12 * (8 // 2)
    assert sum(losses[-4:]) < 0.7 * sum(losses[:4])
    proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
    assert proxies[-1] > proxies[0] and summary["best_acceptance_proxy"] == pytest.approx(max(proxies), abs=1e-4)
    selected = load_drafter(tmp_path / "model", tiny_target.model, tiny_target.tokenizer)
    best_step = summary["best_step"]
    assert best_step == max(summary["acceptance_proxy"], key=lambda entry: entry["proxy"])["step"]
    assert (tmp_path / "last" / "model.safetensors").exists()
    probe = torch.tensor([[1, 2, 3, 4]])
    last = load_drafter(tmp_path / "last", tiny_target.model, tiny_target.tokenizer)
    same = torch.allclose(selected(probe).logits, last(probe).logits)
    assert same == (best_step == summary["steps"])  # model/ is the best-proxy weights, not blindly the last


def test_select_decoder_keeps_the_weights_with_the_best_measured_tau(tiny_target, records_dir, tmp_path):
    """select=decoder runs the lossless speculative decoder on the held-out prompts at every evaluation and keeps
    the weights whose τ is highest; τ is recomputed here from the saved model/ to check it is the one chosen."""
    from eval.decoder import DecodeSettings, speculative_generate
    from models.drafter import TokenDraft
    from train.core.rows import read_rows, split_heldout

    summary, _ = run(tiny_target, records_dir, tmp_path, epochs=6, eval_every=6, select="decoder",
                     select_gamma=3, select_max_new_tokens=12)
    taus = [entry["block_efficiency"] for entry in summary["acceptance_proxy"]]
    assert len(taus) == 5 and all(tau >= 1.0 for tau in taus)  # steps 0, 6, 12, 18, 24
    scored = [entry["loss_tokens"] for entry in summary["acceptance_proxy"]]  # the x axis of bench/tau_vs_tokens.py
    assert scored[0] == 0 and scored == sorted(set(scored)) and scored[-1] == summary["loss_tokens_this_run"]
    assert summary["best_block_efficiency"] == pytest.approx(max(taus), abs=1e-4)
    _, heldout = split_heldout(read_rows(records_dir, "online"), 2)
    selected = load_drafter(tmp_path / "model", tiny_target.model, tiny_target.tokenizer)
    generations = speculative_generate(tiny_target.model, TokenDraft(selected), [r.prompt_ids for r in heldout],
                                       DecodeSettings(gamma=3, max_new_tokens=12),
                                       [tiny_target.tokenizer.eos_token_id])
    tau = sum(g.stats.emitted for g in generations) / sum(g.stats.steps for g in generations)
    assert tau == pytest.approx(max(taus), abs=1e-4)


@pytest.mark.parametrize("config", LOSS_CONFIGS, ids=lambda path: path.stem)
def test_every_loss_config_trains(tiny_target, records_dir, tmp_path, config):
    loss = instantiate(OmegaConf.load(config), _convert_="all")
    summary, curve = run(tiny_target, records_dir, tmp_path, loss=loss, epochs=6)
    assert set(curve[0]) >= {"loss", *loss.terms} and all(torch.isfinite(torch.tensor(e["loss"])) for e in curve)
    losses = [entry["loss"] for entry in curve]
    assert sum(losses[-4:]) < sum(losses[:4]), f"{config.stem}: loss did not go down: {losses}"
    if loss.needs_teacher:  # CE fits the sampled tokens, not the (here near-uniform) target distribution
        proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
        assert proxies[-1] > proxies[0], f"{config.stem}: acceptance proxy did not improve: {proxies}"


def test_accumulation_splits_a_step_without_changing_it(tiny_target, records_dir, tmp_path):
    _, whole = run(tiny_target, records_dir, tmp_path / "whole", batch_size=4, epochs=2)
    _, split = run(tiny_target, records_dir, tmp_path / "split", batch_size=4, accumulation=2, epochs=2)
    assert [e["loss"] for e in split] == pytest.approx([e["loss"] for e in whole], rel=1e-5)
    assert [e["grad_norm"] for e in split] == pytest.approx([e["grad_norm"] for e in whole], rel=1e-4)


def test_offline_teacher_equals_online_when_the_top_k_is_the_whole_vocabulary(tiny_target, records_dir, tmp_path):
    rows = read_rows(records_dir, "offline")[:3]
    model, vocab = tiny_target.model, tiny_target.model.config.vocab_size
    input_ids, attention, positions, _ = collate(rows, 0, 512, model.device)
    with torch.no_grad():
        online = torch.log_softmax(model(input_ids=input_ids, attention_mask=attention).logits[positions], -1)
    offline = offline_teacher_logits(rows, 512, vocab, model.device)[0]
    assert torch.allclose(offline, online, atol=2e-2)  # stored as fp16
    _, online_curve = run(tiny_target, records_dir, tmp_path / "on", epochs=2)
    _, offline_curve = run(tiny_target, records_dir, tmp_path / "off", epochs=2, teacher="offline")
    assert [e["loss"] for e in offline_curve] == pytest.approx([e["loss"] for e in online_curve], abs=1e-3)


def test_offline_teacher_without_top_k_is_a_clear_error(tiny_target, tmp_path):
    out = tmp_path / "data_gen"
    out.mkdir()
    conversations = [Conversation(id=str(i), source="t", messages=[{"role": "user", "content": p}])
                     for i, p in enumerate(TINY_PROMPTS)]
    generate(tiny_target.model, tiny_target.tokenizer, conversations, GenerationSettings(max_new_tokens=8), out,
             quiet_tracker(out, "data_gen"))
    with pytest.raises(ValueError, match="data_gen.top_k_logprobs"):
        run(tiny_target, out, tmp_path / "o", teacher="offline")


def test_on_policy_rows_are_the_drafters_own_answers(tiny_target, records_dir, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    drafter = build_drafter(SPEC, model, tokenizer).eval()
    rows = read_rows(records_dir, "online")[:3]
    settings = DistillSettings(on_policy=OnPolicySettings(ratio=1.0, sampling={"temperature": 0.0}, max_new_tokens=6))
    answered = on_policy_rows(drafter, rows, settings, step=0, pad_id=tokenizer.pad_token_id, stop_ids=[-1])
    for row, new in zip(rows, answered):
        greedy = drafter.generate(torch.tensor([row.prompt_ids]), max_new_tokens=6, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)[0, len(row.prompt_ids):].tolist()
        assert new.input_ids == row.prompt_ids + greedy and new.input_ids != row.input_ids
        assert new.loss_mask == [0] * len(row.prompt_ids) + [1] * 6
    _, curve = run(tiny_target, records_dir, tmp_path, epochs=3, on_policy=OnPolicySettings(ratio=0.5))
    flags = [entry["on_policy"] for entry in curve]
    assert any(flags) and not all(flags)


def test_lora_trains_adapters_and_saves_plain_weights(tiny_target, records_dir, tmp_path):
    before = build_drafter(SPEC, tiny_target.model, tiny_target.tokenizer).state_dict()
    summary, curve = run(tiny_target, records_dir, tmp_path, epochs=4, select="last",
                         lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    saved = load_drafter(tmp_path / "model", tiny_target.model, tiny_target.tokenizer).state_dict()
    assert not any("lora" in name for name in saved)  # merged: loads as a plain LlamaForCausalLM
    changed = {name for name in before if not torch.equal(before[name], saved[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)


def test_nan_loss_is_a_clear_error_and_applies_nothing(tiny_target, records_dir, tmp_path):
    def broken(student, teacher, mask, labels=None):
        return forward_kl(student, teacher, mask) * float("nan")

    with pytest.raises(FloatingPointError, match=r"distill step 0 \(epoch 0, records .*\): loss is nan"):
        run(tiny_target, records_dir, tmp_path, loss=LossMix({"broken": {"fn": broken}}), select="last")
    assert not (tmp_path / "last").exists()


def test_bad_batch_split_names_the_keys(tiny_target, records_dir, tmp_path):
    with pytest.raises(ValueError, match="distill.batch_size=3 must divide"):
        run(tiny_target, records_dir, tmp_path, batch_size=3, accumulation=2)
    with pytest.raises(ValueError, match=r"distill.teacher='teacher': must be one of \['online', 'offline'\]"):
        DistillSettings(teacher="teacher")


def test_reduced_vocabulary_drafter_trains_saves_and_decodes_inside_its_vocabulary(tiny_target, records_dir,
                                                                                   tmp_path):
    from dataclasses import replace

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    answers = [row.input_ids for row in read_rows(records_dir, "online")]
    drafter = build_drafter(replace(SPEC, draft_vocab_size=48), model, tokenizer, token_lists=answers)
    head = drafter.get_output_embeddings()
    assert head.weight.shape[0] == 48 and tokenizer.eos_token_id in head.d2t.tolist()
    hidden = torch.randn(2, 32)
    full = head(hidden)
    assert torch.equal(full[:, head.d2t], head.compact(hidden))
    outside = torch.ones(model.config.vocab_size, dtype=torch.bool)
    outside[head.d2t] = False
    assert torch.isinf(full[:, outside]).all()
    settings = DistillSettings(epochs=6, batch_size=2, heldout_records=2, optim=OptimSettings(lr=1e-2, warmup_steps=2))
    summary = distill(drafter, model, tokenizer, records_dir, FKL, settings, tmp_path, quiet_tracker(tmp_path))
    proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
    assert proxies[-1] > proxies[0]
    reloaded = load_drafter(tmp_path / "last", model, tokenizer)
    probe = torch.tensor([answers[0][:12]])
    assert torch.equal(reloaded(probe).logits, drafter.eval()(probe).logits)
    generated = reloaded.generate(probe, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert set(generated[0, 12:].tolist()) <= set(head.d2t.tolist())


def test_tracker_gets_every_loss_term_rate_norm_throughput_memory_and_proxy(tiny_target, records_dir, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    tracker = quiet_tracker(tmp_path)
    mix = LossMix({"fkl": {"fn": forward_kl, "weight": 0.5}, "ce": {"fn": cross_entropy, "weight": 0.5}})
    distill(build_drafter(SPEC, model, tokenizer), model, tokenizer, records_dir, mix,
            DistillSettings(epochs=1, batch_size=2, heldout_records=2, log_every=1), tmp_path, tracker)
    keys = set().union(*(entry.keys() for entry in tracker.history))
    assert keys >= {"distill/loss", "distill/loss_fkl", "distill/loss_ce", "distill/lr", "distill/grad_norm",
                    "distill/tokens_per_s", "distill/loss_tokens_per_s", "distill/peak_memory_mib",
                    "distill/acceptance_proxy"}
    assert all(entry["distill/peak_memory_mib"] > 0 for entry in tracker.history if "distill/peak_memory_mib" in entry)


def test_corpus_rows_score_every_token_and_join_training_only(tiny_target, records_dir, tmp_path):
    """distill.corpus_records: conversations of the corpus group become training rows (every next token scored),
    the held-out rows stay data_gen's; too few documents are reported, not silently accepted."""
    from data_gen.sources import PromptSourceSpec
    from train.core.rows import corpus_rows

    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.jsonl").write_text("".join(f'{{"text": "document {i}: the quick brown fox"}}\n' for i in range(5)))
    spec = PromptSourceSpec(name="texts", format="text", location=str(folder))
    tokenizer = tiny_target.tokenizer
    rows, report = corpus_rows(tokenizer, spec, tmp_path / "cache", 3, 16)
    assert len({row.id for row in rows}) == 3 and all(row.id.startswith("corpus:") for row in rows)
    assert all(len(row.input_ids) == 16 and row.loss_mask == [0] + [1] * 15 for row in rows)
    assert report["kept"] == 5
    few, _ = corpus_rows(tokenizer, spec, tmp_path / "cache", 9, 16)
    assert len(few) == 5
    summary, _ = run(tiny_target, records_dir, tmp_path / "out", extra_rows=rows)
    assert summary["records"] == len(read_rows(records_dir, "online")) - 2 + 3 and summary["heldout_records"] == 2
    with pytest.raises(ValueError, match="corpus_records > 0 .* distill.teacher=online and distill.on_policy.ratio=0"):
        run(tiny_target, records_dir, tmp_path / "bad", extra_rows=rows,
            on_policy=OnPolicySettings(ratio=0.5))
