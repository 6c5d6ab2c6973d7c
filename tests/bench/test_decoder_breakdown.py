"""bench/decoder_breakdown.py's accounting, on tiny real models: every timed part is counted once (a call's own
time, never its callees' too), the parts land where they belong, decoding is unchanged while timed, and every
patch is undone afterwards."""
from __future__ import annotations

import time
from types import SimpleNamespace

import eval.decoder as decoder
from bench.decoder_breakdown import PARTS, Clock, breakdown
from eval.decoder import DecodeSettings, plain_generate
from models.drafter import TokenDraft
from models.lookup import LookupDraft, LookupSpec, MergedDraft, build_lookup_drafter
from tests.eval.test_decoder import VOCAB, synthetic_pair


def test_a_call_counts_its_own_time_and_not_its_callees():
    clock = Clock()
    inner = clock.wrap("inner", lambda: time.sleep(0.05))

    def outer():
        time.sleep(0.02)
        inner()

    clock.wrap("outer", outer)()
    assert 0.05 <= clock.seconds["inner"] < 0.065
    assert 0.02 <= clock.seconds["outer"] < 0.035


def test_every_row_is_split_into_its_parts_and_decodes_as_plain():
    target, drafter = synthetic_pair()
    loaded = SimpleNamespace(model=target)
    prompts = [[1, 2, 3, 1, 2], [4, 2, 1]]
    items = [{"prompt_ids": p} for p in prompts]
    settings = DecodeSettings(gamma=3, max_new_tokens=12)
    plain = plain_generate(target, prompts, settings, stop_ids=[])
    functions = {name: getattr(decoder, name) for name in ("_draft_chain", "_accept_general", "head_logits")}
    forward = decoder._Target.forward

    def lookup():
        return LookupDraft(build_lookup_drafter(LookupSpec(sources=("prompt",), max_ngram=2), VOCAB))

    rows = {"plain": (None, settings), "chain": (TokenDraft(drafter), settings),
            "tree": (TokenDraft(drafter), DecodeSettings(tree=(2, 1), max_new_tokens=12)),
            "lookup": (lookup(), settings), "merged": (MergedDraft(lookup(), TokenDraft(drafter), 3), settings)}
    results = {name: breakdown(loaded, draft, items, decode, []) for name, (draft, decode) in rows.items()}
    for name, result in results.items():
        assert result["outputs"] == plain, name
        parts = result["parts"]
        assert set(parts) == set(PARTS) and all(seconds >= 0 for seconds in parts.values()), name
        assert 0 <= result["rest"] < result["wall"], name
        assert parts["target forwards"] > 0, name
    assert results["plain"]["parts"]["drafter forwards"] == 0 == results["plain"]["parts"]["acceptance"]
    for name in ("chain", "tree", "merged"):
        assert results[name]["parts"]["drafter forwards"] > 0, name
        assert results[name]["parts"]["acceptance"] > 0, name
    assert results["lookup"]["parts"]["drafter forwards"] == 0 < results["lookup"]["parts"]["lookup"]
    assert results["merged"]["parts"]["lookup"] > 0
    assert decoder._Target.forward is forward  # every patch undone
    assert all(getattr(decoder, name) is function for name, function in functions.items())
    assert "catch_up" not in vars(rows["chain"][0])
