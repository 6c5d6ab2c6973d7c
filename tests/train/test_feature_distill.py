"""Feature-level drafters (EAGLE, FSPAD) in distill's one training loop, on the tiny target: they learn the
target's features and first-token distribution, save and load, and honour what token drafters get (accumulation,
LoRA, select=decoder); the partial-alignment loss regresses only its share of the feature dimensions. Exact resume
after SIGKILL: tests/train/test_resume.py; DeepSpeed data parallel: tests/train/test_deepspeed.py."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from losses.feature import FeatureLoss, feature_regression
from models.cache import captured_layers
from models.drafter import LoraSettings
from models.feature_drafter import FeatureDraft, FeatureDrafterSpec, build_feature_drafter, load_feature_drafter
from tests.conftest import quiet_tracker
from train.distill import DistillSettings, OnPolicySettings, distill
from train.core.optim import OptimSettings
from train.core.rows import read_rows, split_heldout


def run(tiny_target, records_dir, out, loss=FeatureLoss(feature_noise=0.1), sampling=False, spec=None, **overrides):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    answers = [row.input_ids[len(row.prompt_ids):] for row in read_rows(records_dir, "online")]
    drafter = build_feature_drafter(spec or FeatureDrafterSpec(feature_sampling=sampling), model, answers)
    settings = DistillSettings(**{"epochs": 8, "batch_size": 2, "heldout_records": 2, "log_every": 1,
                                  "optim": OptimSettings(lr=3e-3, warmup_steps=2)} | overrides)
    summary = distill(drafter, model, tokenizer, records_dir, loss, settings, out, quiet_tracker(out),
                      stop_ids=[tokenizer.eos_token_id])
    curve = [json.loads(line) for line in (out / "curve.jsonl").read_text().splitlines()]
    return drafter, summary, curve


def test_feature_regression_full_partial_and_masked():
    predicted, target = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    expected = F.smooth_l1_loss(predicted[mask], target[mask])
    assert torch.allclose(feature_regression(predicted, target, mask), expected)
    changed = predicted.clone()
    changed[..., 4:] += 5.0          # dimensions outside the aligned half
    changed[~mask] = float("nan")   # masked positions
    assert torch.allclose(feature_regression(changed, target, mask, aligned_fraction=0.5),
                          feature_regression(predicted, target, mask, aligned_fraction=0.5))
    assert not torch.allclose(feature_regression(changed.nan_to_num(), target, mask),
                              feature_regression(predicted, target, mask))
    with pytest.raises(ValueError, match="aligned_fraction"):
        feature_regression(predicted, target, mask, aligned_fraction=0.0)


@pytest.mark.parametrize("sampling, loss", [(False, FeatureLoss(feature_noise=0.1)),
                                            (True, FeatureLoss(aligned_fraction=0.5, feature_noise=0.1))],
                         ids=["eagle", "fspad"])
def test_feature_drafter_learns_and_round_trips(tiny_target, records_dir, tmp_path, sampling, loss):
    drafter, summary, curve = run(tiny_target, records_dir, tmp_path, loss=loss, sampling=sampling)
    assert sum(e["feature"] for e in curve[-4:]) < sum(e["feature"] for e in curve[:4])
    proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
    assert proxies[-1] > proxies[0]
    assert summary["drafter_kind"] == "feature" and summary["feature_sampling"] is sampling
    reloaded = load_feature_drafter(tmp_path / "last", tiny_target.model)
    features, embeddings, attention = torch.randn(1, 5, 64), torch.randn(1, 5, 64), torch.ones(1, 5)
    with torch.no_grad():
        assert torch.equal(reloaded(features, embeddings, attention), drafter.eval()(features, embeddings, attention))
    assert reloaded.spec.feature_sampling is sampling


def test_accumulation_splits_a_feature_step_without_changing_it(tiny_target, records_dir, tmp_path):
    loss = FeatureLoss()  # no input noise: the two runs must see the same numbers
    _, _, whole = run(tiny_target, records_dir, tmp_path / "whole", loss=loss, batch_size=4, epochs=2)
    _, _, split = run(tiny_target, records_dir, tmp_path / "split", loss=loss, batch_size=4, accumulation=2,
                      epochs=2)
    assert len(whole) == 4
    assert [e["loss"] for e in split] == pytest.approx([e["loss"] for e in whole], rel=1e-5)
    assert [e["grad_norm"] for e in split] == pytest.approx([e["grad_norm"] for e in whole], rel=1e-4)


def test_lora_and_select_decoder_on_a_feature_drafter(tiny_target, records_dir, tmp_path):
    """LoRA adapters train only the named projections and are merged into plain weights when saved;
    select=decoder keeps the weights whose measured τ is best, which decoding with the saved model/ reproduces."""
    from eval.decoder import DecodeSettings, speculative_generate

    before = build_feature_drafter(FeatureDrafterSpec(), tiny_target.model).state_dict()
    _, summary, _ = run(tiny_target, records_dir, tmp_path, epochs=6, eval_every=6, select="decoder",
                        select_gamma=3, select_max_new_tokens=12, optim=OptimSettings(lr=2e-2, warmup_steps=2),
                        lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    assert summary["lora"] and summary["selected"] == "decoder"
    saved = load_file(str(tmp_path / "last" / "model.safetensors"))
    assert not any("lora" in name for name in saved | load_file(str(tmp_path / "model" / "model.safetensors")))
    changed = {name for name in saved if not torch.equal(before[name], saved[name])}
    assert changed and all("q_proj" in name or "v_proj" in name for name in changed)
    taus = [entry["block_efficiency"] for entry in summary["acceptance_proxy"]]
    assert len(taus) == 5 and all(tau >= 1.0 for tau in taus)
    _, heldout = split_heldout(read_rows(records_dir, "online"), 2)
    selected = load_feature_drafter(tmp_path / "model", tiny_target.model)
    generations = speculative_generate(tiny_target.model, FeatureDraft(selected, tiny_target.model),
                                       [row.prompt_ids for row in heldout], DecodeSettings(gamma=3, max_new_tokens=12),
                                       [tiny_target.tokenizer.eos_token_id])
    tau = sum(g.stats.emitted for g in generations) / sum(g.stats.steps for g in generations)
    assert tau == pytest.approx(summary["best_block_efficiency"], abs=1e-4) == pytest.approx(max(taus), abs=1e-4)


def test_settings_a_feature_drafter_cannot_honour_are_refused_by_name(tiny_target, records_dir, tmp_path):
    from losses.kl import forward_kl
    from losses.mix import LossMix

    settings = DistillSettings(batch_size=4, on_policy=OnPolicySettings(ratio=0.5), teacher="offline")
    with pytest.raises(ValueError) as refused:
        run(tiny_target, records_dir, tmp_path / "out", **{k: getattr(settings, k) for k in ("on_policy", "teacher")})
    for key in ("distill.on_policy.ratio=0.5", "distill.teacher='offline'"):
        assert key in str(refused.value)
    with pytest.raises(ValueError, match="loss=eagle or loss=fspad"):
        run(tiny_target, records_dir, tmp_path / "out", loss=LossMix({"fkl": {"fn": forward_kl}}))
    assert not (tmp_path / "out").exists()  # refused before anything was written


EAGLE3 = FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=96, layout="eagle3")


def test_the_unrolled_steps_are_what_drafting_computes(tiny_target, records_dir):
    """Training-time test: step j at position t of `FeatureDrafter.unrolled` equals the decoder's (j+1)-th draft
    logits from the context whose last true feature is f_{t-j}, the drafts in between being the sequence's own
    tokens (teacher forcing); with fused layers and an own head over a draft vocabulary."""
    target = tiny_target.model
    answers = [row.input_ids for row in read_rows(records_dir, "online")]
    drafter = build_feature_drafter(EAGLE3, target, answers).eval()
    sequence = answers[0][:20]
    ids = torch.tensor([sequence])
    with torch.no_grad(), captured_layers(target, drafter.feature_layers) as captured:
        target.get_decoder()(input_ids=ids)
        features = captured[0]
        assert features.shape == (1, len(sequence), 2 * target.config.hidden_size)
        steps = drafter.unrolled(features[:, :-1], target.get_input_embeddings()(ids)[:, 1:],
                                 torch.ones(1, len(sequence) - 1), 3)
        for j in range(3):
            for t in range(j + 1, len(sequence) - 2):
                draft = FeatureDraft(drafter, target)
                draft.start(1, len(sequence) + 4)
                n = t - j + 1  # committed tokens x_0 .. x_n: the last true pair is (f_{n-1}, x_n)
                logits = draft.catch_up([sequence[: n + 1]], features)
                for i in range(j):  # draft the sequence's own next tokens
                    token = torch.tensor([[sequence[n + 1 + i]]])
                    logits = draft.extend(token, [0], torch.ones(1, i + 1, dtype=torch.bool), torch.tensor([i]),
                                          i)[:, 0]
                expected = drafter.logits(steps[j][:, t], target)
                assert torch.allclose(logits, expected, atol=1e-4), (j, t)


def test_an_eagle3_drafter_learns_saves_and_loads(tiny_target, records_dir, tmp_path):
    loss = FeatureLoss(feature_weight=0.0, token_weight=1.0, unroll=3)
    drafter, summary, curve = run(tiny_target, records_dir, tmp_path, loss=loss, spec=EAGLE3, train_on="all",
                                  optim=OptimSettings(lr=1e-2, warmup_steps=2))
    assert summary["feature_layers"] == [0, 1] and summary["draft_vocab_size"] == 96 and summary["unroll"] == 3
    assert {"token", "step1_token", "step2_token"} <= set(curve[0]) and "feature" not in curve[0]
    for name in ("token", "step2_token"):
        assert sum(e[name] for e in curve[-4:]) < sum(e[name] for e in curve[:4])
    proxies = [entry["proxy"] for entry in summary["acceptance_proxy"]]
    assert proxies[-1] > proxies[0]
    d2t = drafter.head.d2t
    assert len(d2t) == 96 and tiny_target.tokenizer.eos_token_id in d2t.tolist() and d2t.equal(d2t.sort().values)
    reloaded = load_feature_drafter(tmp_path / "last", tiny_target.model)
    assert reloaded.spec == EAGLE3 and torch.equal(reloaded.head.d2t, d2t)
    hidden = torch.randn(1, 5, 64)
    with torch.no_grad():
        full = reloaded.logits(hidden, tiny_target.model)
        assert torch.equal(full, drafter.eval().logits(hidden, tiny_target.model))
    outside = torch.ones(full.shape[-1], dtype=torch.bool)
    outside[d2t] = False
    assert torch.isinf(full[..., outside]).all() and torch.isfinite(full[..., d2t]).all()


def test_bad_eagle3_settings_name_their_key(tiny_target):
    with pytest.raises(ValueError, match="feature_layers: layer 7 is outside the target's 2 layers"):
        build_feature_drafter(FeatureDrafterSpec(feature_layers=(0, 7)), tiny_target.model)
    with pytest.raises(ValueError, match="distinct"):
        FeatureDrafterSpec(feature_layers=(1, 1))
    with pytest.raises(ValueError, match="needs the training tokens"):
        build_feature_drafter(EAGLE3, tiny_target.model)
    with pytest.raises(ValueError, match="loss.unroll=0"):
        FeatureLoss(unroll=0)


@pytest.mark.parametrize("spec", [FeatureDrafterSpec(), EAGLE3], ids=["eagle", "eagle3"])
def test_the_feature_cache_trains_as_the_target_in_the_loop_does(tiny_target, records_dir, tmp_path, spec):
    """distill.feature_cache: one prefill stores the target's side; training from it follows the online run up to
    fp16 rounding of the stored features, and a matching cache is reused, not recomputed."""
    loss = FeatureLoss(feature_weight=0.0, token_weight=1.0, unroll=2) if spec.draft_vocab_size else FeatureLoss()
    _, online, online_curve = run(tiny_target, records_dir, tmp_path / "online", loss=loss, spec=spec, epochs=2)
    _, cached, cached_curve = run(tiny_target, records_dir, tmp_path / "cached", loss=loss, spec=spec, epochs=2,
                                  feature_cache=True)
    assert cached["feature_cache"] and not online["feature_cache"]
    # recorded relative to the stage's folder: the stage writes into distill.partial/, renamed when done
    assert cached["feature_cache_folder"] == "features" and online["feature_cache_folder"] is None
    assert [e["loss"] for e in cached_curve] == pytest.approx([e["loss"] for e in online_curve], rel=2e-2)
    assert cached["best_acceptance_proxy"] == pytest.approx(online["best_acceptance_proxy"], abs=2e-2)
    manifest = tmp_path / "cached" / "features" / "manifest.json"
    made = json.loads(manifest.read_text())
    assert made["records"] == len(read_rows(records_dir, "online")) and made["layers"] == list(spec.feature_layers or [])
    stamp = manifest.stat().st_mtime_ns
    run(tiny_target, records_dir, tmp_path / "cached", loss=loss, spec=spec, epochs=2, feature_cache=True)
    assert manifest.stat().st_mtime_ns == stamp  # reused


def test_runs_sharing_a_feature_cache_folder_make_it_once(tiny_target, records_dir, tmp_path):
    """distill.feature_cache_dir: the second run over the same records and target reuses the first run's cache;
    the folder is keyed by that fingerprint and recorded in the summary (the online stage's rehearsal reads it there),
    and the setting is refused where no cache is made."""
    shared = tmp_path / "shared"
    _, first, _ = run(tiny_target, records_dir, tmp_path / "a", feature_cache=True, feature_cache_dir=str(shared),
                      epochs=1)
    caches = [path for path in shared.iterdir() if path.name != ".locks"]
    assert len(caches) == 1 and not (tmp_path / "a" / "features").exists()
    assert first["feature_cache_folder"] == str(caches[0])
    stamp = (caches[0] / "manifest.json").stat().st_mtime_ns
    _, second, _ = run(tiny_target, records_dir, tmp_path / "b", feature_cache=True, feature_cache_dir=str(shared),
                       epochs=1)
    assert (caches[0] / "manifest.json").stat().st_mtime_ns == stamp and second["final_loss"] == first["final_loss"]
    with pytest.raises(ValueError, match="feature_cache_dir=.*distill.feature_cache=true"):
        run(tiny_target, records_dir, tmp_path / "c", feature_cache_dir=str(shared), epochs=1)


def test_the_feature_cache_checks_the_disk_first_and_discards_a_partial_one(tiny_target, records_dir, tmp_path,
                                                                           monkeypatch):
    import shutil
    from collections import namedtuple

    partial = tmp_path / "features.partial"
    partial.mkdir()
    (partial / "shard-00000.safetensors").write_bytes(b"cut off by kill -9")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 10))
    with pytest.raises(OSError, match="estimated disk use .* Not enough space.*distill.feature_cache=false"):
        run(tiny_target, records_dir, tmp_path, feature_cache=True)
    monkeypatch.undo()
    run(tiny_target, records_dir, tmp_path, feature_cache=True, epochs=1)
    assert not partial.exists() and (tmp_path / "features" / "manifest.json").exists()


@pytest.mark.parametrize("tree", [(), (2, 2)], ids=["chain", "tree"])
def test_an_eagle3_drafter_decodes_losslessly_in_chains_and_trees_and_batches(tiny_target, records_dir, tree):
    from eval.decoder import DecodeSettings, plain_generate, speculative_generate

    target = tiny_target.model
    answers = [row.input_ids for row in read_rows(records_dir, "online")]
    drafter = build_feature_drafter(EAGLE3, target, answers).eval()
    prompts = [row.prompt_ids for row in read_rows(records_dir, "online")[:3]]
    settings = DecodeSettings(gamma=3, tree=tree, max_new_tokens=16, batch_size=3)
    expected = plain_generate(target, prompts, settings, stop_ids=[])
    generations = speculative_generate(target, FeatureDraft(drafter, target), prompts, settings, stop_ids=[])
    assert [g.tokens for g in generations] == expected
    assert sum(g.stats.drafted for g in generations) > 0


def test_prompt_lookup_hits_are_the_tokens_the_lookup_guesses_from_the_row_itself():
    from models.lookup import prompt_lookup_hits

    #         0  1  2  3  4  5  6  7  8
    tokens = [5, 6, 7, 5, 6, 7, 5, 9, 6]
    hits = prompt_lookup_hits(tokens)
    # 4: "7 5" was followed by 6; 5: "5 6" by 7; 6: "6 7" by 5; 7: "6 7 5" by 6, not 9; 8: "9" never seen, no guess
    assert hits == [False, False, False, False, True, True, True, False, False]


def test_lookup_aware_distillation_leaves_out_exactly_the_guessed_positions(tiny_target, records_dir):
    """loss.lookup_hit_weight=0 drops from the token term every scored position whose label prompt lookup guesses
    from its own row, and nothing else; 1 is the plain loss."""
    from models.lookup import prompt_lookup_hits
    from train.core.features import FeatureTraining, feature_batch

    target = tiny_target.model
    rows = read_rows(records_dir, "online")[:3]
    drafter = build_feature_drafter(EAGLE3, target, [row.input_ids for row in rows]).eval()
    hits = {row.id: prompt_lookup_hits(row.input_ids) for row in rows}
    module = FeatureTraining(drafter, 2)
    with torch.no_grad():
        plain, _ = feature_batch(module, target, drafter, rows, 0, 4096, steps=2, every_position=True)
        aware, _ = feature_batch(module, target, drafter, rows, 0, 4096, steps=2, every_position=True,
                                 lookup_hits=hits, hit_weight=0.0)
    for (*_, mask, keep_plain), (*_, _, keep_aware) in zip(plain, aware):
        width = mask.shape[1]
        guessed = torch.tensor([(hits[row.id][2: 2 + width] + [False] * width)[:width] for row in rows])[mask]
        assert guessed.any() and (~guessed).any()
        assert torch.equal(keep_aware[0], keep_plain[0] & ~guessed)


def test_features_beyond_fp16_range_are_cached_in_bf16_not_as_inf():
    """Gemma 3's middle layers reach 1e5, past fp16's 65,504: such a row is stored in bf16 (finite, within bf16's
    rounding), and a row that fits keeps fp16's finer rounding."""
    from train.core.feature_cache import compact

    small = torch.tensor([[1.0, -2.5, 60000.0]])
    large = torch.tensor([[1.0, -2.5, 101000.4]])
    assert compact(small).dtype == torch.float16 and torch.equal(compact(small).float(), small.half().float())
    assert large.half().isinf().any()  # what a plain fp16 cache would hold
    stored = compact(large)
    assert stored.dtype == torch.bfloat16 and torch.isfinite(stored).all()
    assert torch.allclose(stored.float(), large, rtol=1 / 128)


def flip_every_fifth_value(shard) -> None:
    """Every fifth fp16 value of a shard's features negated and nudged: still finite, no longer the target's."""
    from safetensors.torch import save_file

    tensors = load_file(str(shard))
    for name, tensor in tensors.items():
        if tensor.dtype == torch.float16:
            tensor.view(-1)[::5] = -tensor.view(-1)[::5] + 0.5
    save_file(tensors, str(shard))


@pytest.mark.parametrize("damage", ["values flipped", "bytes flipped", "truncated", "missing", "manifest cut"])
def test_a_damaged_feature_cache_is_named_moved_aside_and_rebuilt(tiny_target, records_dir, tmp_path, capsys,
                                                                  damage):
    """A cache is reused only when every shard is what was written (size and sha256 in its manifest): a damaged one
    (finite but other values, bytes flipped, a shard cut short or gone, an unreadable manifest) is named, moved
    aside to `<folder>.damaged/` and rebuilt, and what is trained on is the target's own features again."""
    from train.core.feature_cache import MANIFEST, build_or_load

    rows = read_rows(records_dir, "train")
    folder = tmp_path / "features"
    built = {k: [t.clone() for t in v] for k, v in build_or_load(tiny_target.model, rows, (0, 1), 64, 0,
                                                                   folder).entries.items()}  # not the files' maps
    shard = sorted(folder.glob("shard-*.safetensors"))[0]
    if damage == "values flipped":
        flip_every_fifth_value(shard)
    elif damage == "bytes flipped":
        data = bytearray(shard.read_bytes())
        data[::7] = bytes(b ^ 0xFF for b in data[::7])
        shard.write_bytes(bytes(data))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    elif damage == "missing":
        shard.unlink()
    else:
        (folder / MANIFEST).write_text((folder / MANIFEST).read_text()[:-40])
    capsys.readouterr()
    again = build_or_load(tiny_target.model, rows, (0, 1), 64, 0, folder).entries
    said = capsys.readouterr().out
    named = folder / MANIFEST if damage == "manifest cut" else shard
    assert f"feature cache: {named}" in said and "moved aside to" in said and "rebuilding" in said
    assert (tmp_path / "features.damaged").is_dir() and "reusing" not in said
    assert again.keys() == built.keys()
    assert all(torch.equal(again[k][i], built[k][i]) for k in built for i in range(3))
    capsys.readouterr()
    build_or_load(tiny_target.model, rows, (0, 1), 64, 0, folder)  # the rebuilt cache verifies and is reused
    assert "reusing" in capsys.readouterr().out
