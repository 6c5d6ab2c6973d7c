"""models/lookup.py: training-free drafters (prompt lookup, corpus n-grams) propose what followed the longest
matching suffix, abstain when nothing matches, save and load, and decode losslessly in chains and trees."""
from __future__ import annotations

import math

import pytest
import torch

from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from models.draft import DraftDefaults
from models.kinds import kind_of, kind_of_folder, kind_of_spec
from models.lookup import BASELINES, LookupDraft, LookupFirstDraft, LookupSpec, baseline_specs, build_lookup_drafter
from models.sampling import SamplingSettings

VOCAB = 20

# chains, trees and batches of rows: every lossless check below runs all three
EVERY_SHAPE = pytest.mark.parametrize("settings", [DecodeSettings(gamma=4, max_new_tokens=40),
                                                   DecodeSettings(tree=(2, 2), max_new_tokens=40),
                                                   DecodeSettings(gamma=3, max_new_tokens=40, batch_size=3)],
                                      ids=["chain", "tree", "batched"])
REPETITIVE = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [3, 4, 3, 4, 3], [10, 11, 12, 13, 14, 15]]  # some repeat


def draft_for(spec, token_lists=None, masks=None) -> LookupDraft:
    draft = LookupDraft(build_lookup_drafter(spec, VOCAB, token_lists, masks))
    draft.start(1, 64)
    return draft


def test_prompt_lookup_proposes_what_followed_the_longest_match():
    draft = draft_for(LookupSpec(max_ngram=3))
    logits = draft.catch_up([[1, 2, 3, 9, 4, 2, 3, 7, 5, 1, 2, 3]], None)  # suffix 1 2 3: followed once by 9
    assert logits.argmax(-1).tolist() == [9] and torch.isfinite(logits).sum() == 1  # longest n only
    chained = draft.extend(torch.tensor([[9]]), [0], None, None, 0)[:, 0]  # context now ... 1 2 3 9: then 4
    assert chained.argmax(-1).tolist() == [4]
    nothing = draft.extend(torch.tensor([[11]]), [0], None, None, 1)[:, 0]  # 11 never seen: abstain
    assert torch.isinf(nothing).all()


def test_counts_rank_the_candidates_and_recency_breaks_ties():
    draft = draft_for(LookupSpec(max_ngram=1))
    logits = draft.catch_up([[5, 6, 5, 7, 5, 6, 5, 8, 5]], None)  # after 5: 6 twice, 7 once, 8 once (latest)
    finite = torch.isfinite(logits[0])
    assert finite.nonzero().flatten().tolist() == [6, 7, 8]
    assert logits[0, 6] > logits[0, 8] > logits[0, 7]
    assert math.isclose(float(logits[0, 6].exp()), 2 + 0.5 * 5 / 8, rel_tol=1e-6)


def test_the_corpus_table_counts_answer_tokens_only_and_the_prompt_wins_at_equal_length():
    answers, masks = [[1, 2, 3, 4], [1, 2, 3, 4]], [[0, 0, 1, 1], [0, 0, 1, 1]]
    corpus = draft_for(LookupSpec(sources=("corpus",), max_ngram=2), answers, masks)
    assert corpus.catch_up([[7, 2, 3]], None).argmax(-1).tolist() == [4]  # (2, 3) -> 4 counted twice
    assert torch.isinf(corpus.catch_up([[7, 1]], None)).all()           # 1 -> 2: a prompt token, not counted
    both = draft_for(LookupSpec(sources=("prompt", "corpus"), max_ngram=2), answers, masks)
    assert both.catch_up([[2, 3, 9, 0, 2, 3]], None).argmax(-1).tolist() == [9]  # prompt match beats corpus
    with pytest.raises(ValueError, match="needs this run's data_gen records"):
        build_lookup_drafter(LookupSpec(sources=("corpus",)), VOCAB)
    with pytest.raises(ValueError, match="eval.baselines.*unknown"):
        baseline_specs(["prompt_lookup", "ngarm"])


def test_a_lookup_drafter_saves_loads_and_is_its_own_kind(tiny_target, tmp_path):
    spec = BASELINES["prompt_lookup+ngram"]
    kind = kind_of_spec(spec)
    drafter = kind.build(spec, tiny_target, token_lists=[[1, 2, 3, 4]], masks=[[1, 1, 1, 1]])
    assert kind_of(drafter) is kind and not kind.trainable and kind.parameters_per_token(drafter, None) == 0
    kind.save(drafter, tiny_target, tmp_path)
    assert kind_of_folder(tmp_path) is kind
    loaded = kind.load(tmp_path, tiny_target)
    assert loaded.spec == spec and loaded.corpus.next == drafter.corpus.next


def test_token_recycling_proposes_the_targets_last_top_k_after_a_token():
    spec = LookupSpec(sources=("recycled",), recycle_k=3)
    draft = draft_for(spec)
    assert torch.isinf(draft.catch_up([[1, 4]], None)).all()  # nothing observed yet: abstain
    scores = torch.full((1, 2, VOCAB), -5.0)
    scores[0, 0, [7, 2, 9]] = torch.tensor([3.0, 2.0, 1.0])   # after token 4 the target ranked 7 > 2 > 9
    draft.observe(torch.tensor([[4, 11]]), scores)
    logits = draft.catch_up([[1, 4]], None)[0]
    assert torch.isfinite(logits).nonzero().flatten().tolist() == [2, 7, 9]
    assert logits[7] > logits[2] > logits[9]
    draft.reset()
    assert torch.isinf(draft.catch_up([[1, 4]], None)).all()


@EVERY_SHAPE
@pytest.mark.parametrize("name", ["prompt_lookup", "token_recycling"])
def test_lookup_drafting_is_lossless_and_accepts_on_repetitive_text(tiny_target, settings, name):
    model = tiny_target.model
    prompts = REPETITIVE
    plain = plain_generate(model, prompts, settings, stop_ids=[])
    draft = LookupDraft(build_lookup_drafter(BASELINES[name], model.config.vocab_size))
    generations = speculative_generate(model, draft, prompts, settings, stop_ids=[])
    assert [g.tokens for g in generations] == plain
    assert sum(g.stats.accepted for g in generations) > 0  # the tiny target repeats itself: lookup pays
    drafted = sum(g.stats.drafted for g in generations)
    assert drafted < sum(g.stats.steps for g in generations) * settings.depth or settings.tree  # it abstained


def test_sampled_lookup_decoding_runs_and_is_reproducible(tiny_target):
    model = tiny_target.model
    settings = DecodeSettings(gamma=3, sampling=SamplingSettings(temperature=1.0), max_new_tokens=24)
    draft = lambda: LookupDraft(build_lookup_drafter(LookupSpec(), model.config.vocab_size))  # noqa: E731
    first = speculative_generate(model, draft(), [[5, 6, 7, 5, 6, 7, 5]], settings, [], ["k"])
    again = speculative_generate(model, draft(), [[5, 6, 7, 5, 6, 7, 5]], settings, [], ["k"])
    assert first[0].tokens == again[0].tokens and len(first[0].tokens) == 24


def test_min_ngram_ignores_shorter_matches():
    draft = draft_for(LookupSpec(max_ngram=3, min_ngram=2))
    assert draft.catch_up([[4, 5, 9, 6, 5]], None).isinf().all()           # only 1 token (5) matches
    assert draft.catch_up([[4, 5, 9, 6, 4, 5]], None).argmax(-1).tolist() == [9]  # 4 5 matches
    with pytest.raises(ValueError, match="min_ngram=4 is above max_ngram=3"):
        LookupSpec(min_ngram=4)


class FixedDraft(DraftDefaults):
    """A stand-in trained drafter: the same logits at every node, and a record of what it was shown."""

    needs_features = False

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits, self.shown = logits, []

    def start(self, rows, capacity):
        self.shown.append(("start", rows))

    def catch_up(self, sequences, features):
        self.shown.append(("catch_up", [list(s) for s in sequences]))
        return self.logits.expand(len(sequences), -1).clone()

    def extend(self, tokens, parents, local, relative, offset):
        self.shown.append(("extend", tokens.tolist()))
        return self.logits.expand(tokens.shape[0], tokens.shape[1], -1).clone()

    def commit(self, accepted, fed):
        self.shown.append(("commit", accepted))

    def keep_rows(self, rows):
        self.shown.append(("keep_rows", rows))


def test_the_lookup_in_front_overrides_the_trained_drafter_only_where_it_matches():
    trained_logits = torch.arange(VOCAB, dtype=torch.float) / 10  # the trained drafter's argmax: VOCAB - 1
    trained = FixedDraft(trained_logits)
    pair = LookupFirstDraft(draft_for(LookupSpec(max_ngram=2)), trained)
    pair.start(2, 64)
    logits = pair.catch_up([[1, 2, 7, 3, 1, 2], [11, 12]], None)  # row 0: 1 2 -> 7; row 1: no match
    assert logits.argmax(-1).tolist() == [7, VOCAB - 1]
    assert torch.equal(logits[1], trained_logits)  # no guess: the trained drafter's distribution, unchanged
    top2 = logits[0].topk(2).indices.tolist()
    assert top2 == [7, VOCAB - 1]  # a tree's second child is the trained drafter's choice
    assert torch.isfinite(logits).all()  # never abstains: the trained drafter always has a guess
    extended = pair.extend(torch.tensor([[7], [19]]), [0], None, None, 0)[:, 0]  # row 0: ... 2 7 -> 3
    assert extended.argmax(-1).tolist() == [3, VOCAB - 1]
    pair.commit([1, 0], 1)
    pair.keep_rows([1])
    assert [event[0] for event in trained.shown] == ["start", "catch_up", "extend", "commit", "keep_rows"]


def untrained_draft(kind: str, model, tokenizer, prompts):
    """A freshly built drafter of `kind` (token: a standalone LM; eagle3: fused layers and a draft vocabulary)."""
    from models.drafter import DrafterSpec, TokenDraft, build_drafter
    from models.feature_drafter import FeatureDraft, FeatureDrafterSpec, build_feature_drafter

    if kind == "token":
        spec = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
        return TokenDraft(build_drafter(spec, model, tokenizer).eval())
    spec = FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=64, layout="eagle3")
    return FeatureDraft(build_feature_drafter(spec, model, prompts).eval(), model)


@EVERY_SHAPE
@pytest.mark.parametrize("trained", ["token", "eagle3"])
def test_a_trained_drafter_behind_prompt_lookup_decodes_losslessly(tiny_target, settings, trained):

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    prompts = REPETITIVE
    plain = plain_generate(model, prompts, settings, stop_ids=[])
    behind = untrained_draft(trained, model, tokenizer, prompts)
    lookup = LookupDraft(build_lookup_drafter(BASELINES["prompt_lookup"], model.config.vocab_size))
    pair = LookupFirstDraft(lookup, behind)
    assert pair.networks == behind.networks and pair.needs_features == behind.needs_features  # same kernels
    generations = speculative_generate(model, pair, prompts, settings, stop_ids=[])
    assert [g.tokens for g in generations] == plain
    assert sum(g.stats.accepted for g in generations) > 0


def test_merged_proposals_share_the_nodes_where_the_lookup_and_the_drafter_agree():
    from eval.decoder import merge_proposals

    drafted = [([7, 8, 9, 10], [0, 0, 1, 2])] * 3  # a (2, 1) tree: 7 and 8 below the root, 9 below 7, 10 below 8
    chains = [[7, 9, 4, 5], [8, 6], []]  # row 0 follows 7 -> 9, then its own; row 1 leaves at depth 2; row 2 none
    merged = merge_proposals(drafted, chains)
    assert merged[0] == ([7, 8, 9, 10, 4, 5], [0, 0, 1, 2, 3, 5])
    assert merged[1] == ([7, 8, 9, 10, 6], [0, 0, 1, 2, 2])
    assert merged[2] == ([7, 8, 9, 10], [0, 0, 1, 2])
    assert merge_proposals(None, [[3, 4], []]) == [([3, 4], [0, 1]), ([], [])]  # the drafter skipped


def test_a_pruned_drafter_tree_keeps_the_nodes_whose_path_probability_clears_the_bar():
    """draft_pruned: a node survives where the product of the drafter's probabilities along its path is at least
    min_probability and its parent survived; no deeper depth is drafted once nothing survives."""
    from eval.decoder import Tree, draft_pruned

    class Fixed:  # the drafter's distribution: 0.6 / 0.3 / 0.1 over tokens 5 / 6 / 7 at every node
        def __init__(self):
            self.extends = 0

        def catch_up(self, sequences, features):
            return torch.log(torch.tensor([[1e-9] * 5 + [0.6, 0.3, 0.1]])).expand(len(sequences), -1)

        def extend(self, tokens, parents, local, relative, offset):
            self.extends += 1
            return self.catch_up([[0]] * tokens.shape[0], None)[:, None].expand(-1, tokens.shape[1], -1)

    tree = Tree((2, 2, 1))
    draft = Fixed()
    full = draft_pruned(draft, tree, [[1, 2]], None, 0.0)[0]
    assert len(full[0]) == tree.size - 1 and draft.extends == 2
    pruned = draft_pruned(draft, tree, [[1, 2]], None, 0.15)[0]
    # depth 1: 5 (0.6), 6 (0.3); depth 2: 5-5 (0.36), 5-6 (0.18), 6-5 (0.18), 6-6 (0.09: dropped); depth 3: 5-5-5
    # (0.216), 5-6-5 (0.108: dropped), 6-5-5 (0.108: dropped)
    assert pruned == ([5, 6, 5, 6, 5, 5], [0, 0, 1, 1, 2, 3])
    draft.extends = 0
    assert draft_pruned(draft, tree, [[1, 2]], None, 0.7)[0] == ([], []) and draft.extends == 0  # nothing clears it


def test_the_drafter_gate_runs_the_drafter_only_where_its_gain_pays_for_its_cost():
    """DrafterGate: per lookup length, after `warmup` runs, the drafter runs only where its mean gain (accepted
    depth beyond what the lookup's branch shares) beats its cost in tokens; a priced-out length is still tried
    every `explore`-th time."""
    from models.lookup import DrafterGate, chain_nodes

    # a merged tree: the drafter's [5, 6] at the root, the lookup's chain [5, 7, 8] shares node 1
    tokens, parents = [5, 6, 7, 8], [0, 0, 1, 3]
    assert chain_nodes(tokens, parents, [5, 7, 8]) == [1, 3, 4] and chain_nodes(tokens, parents, []) == []
    gate = DrafterGate(depth=3, warmup=2, explore=3)
    for _ in range(2):  # the lookup guessed 3 tokens and got them all; the drafter's node 2 brought nothing
        assert gate.wanted([[5, 7, 8]])
        gate.record([[5, 7, 8]], [(tokens, parents)], [[1, 3, 4]], True, drafter_seconds=0.2, target_seconds=1.0)
    for _ in range(2):  # no lookup guess: the drafter's own token was taken (gain 1 each time)
        assert gate.wanted([[]])
        gate.record([[]], [([5], [0])], [[1]], True, drafter_seconds=0.2, target_seconds=1.0)
    assert gate.wanted([[]])  # gain 1 > cost 0.2 x (1 + 0)
    assert [gate.wanted([[5, 7, 8]]) for _ in range(6)] == [False, False, True, False, False, True]  # explores
    summary = gate.summary()
    assert summary["cost"] == pytest.approx(0.2) and summary["lengths"][3] == {"ran": 2, "gain": 0.0, "priced_out": 6}
    gate.record([[5, 7, 8]], [(tokens, parents)], [[1, 3, 4]], False, drafter_seconds=0.0, target_seconds=1.0)
    gate.record([[]], [([5], [0])], [[1]], True, drafter_seconds=5.0, target_seconds=1.0)  # catches up: not priced
    assert gate.summary()["cost"] == pytest.approx(0.2)  # still 3 priced runs of 0.2 s (the first follows none)
    assert summary["lengths"][0]["gain"] == 1.0
    assert gate.wanted([[], [5, 7, 8]])  # a batch runs it where any row wants it
    with pytest.raises(ValueError, match="warmup"):
        DrafterGate(depth=3, warmup=0)
    from eval.settings import EvalSettings
    from infra.settings import SettingsError

    assert EvalSettings(merged_skip_at="auto").merged_skip_at == "auto"
    for bad in ("sometimes", -1):
        with pytest.raises(SettingsError, match="eval.merged_skip_at"):
            EvalSettings(merged_skip_at=bad)


@EVERY_SHAPE
@pytest.mark.parametrize("trained", ["token", "eagle3"])
@pytest.mark.parametrize("skip_at, min_probability", [(0, 0.0), (2, 0.0), (0, 0.05), ("auto", 0.0)],
                         ids=["always", "skip-at-2", "pruned", "gated"])
def test_a_merged_tree_of_lookup_and_trained_drafter_decodes_losslessly(tiny_target, settings, trained, skip_at,
                                                                        min_probability):
    """eval.merged: the lookup's branch beside the drafter's own chain or tree, verified as one tree per row;
    with skip_at the drafter sits out steps where the lookup's guess is long and catches up later; with
    min_probability its unlikely nodes are not verified."""
    from models.lookup import MergedDraft

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    prompts = REPETITIVE
    plain = plain_generate(model, prompts, settings, stop_ids=[])
    behind = untrained_draft(trained, model, tokenizer, prompts)
    lookup = LookupDraft(build_lookup_drafter(BASELINES["prompt_lookup"], model.config.vocab_size))
    merged = MergedDraft(lookup, behind, depth=5, skip_at=skip_at, min_probability=min_probability)
    generations = speculative_generate(model, merged, prompts, settings, stop_ids=[])
    assert [g.tokens for g in generations] == plain
    stats = [g.stats for g in generations]
    assert sum(s.accepted for s in stats) > 0
    assert max(len(s.accepted_at) for s in stats) == max(settings.depth, 5)  # the lookup's branch is deeper
    runs = sum(s.drafter_runs for s in stats) / sum(s.steps for s in stats)
    if skip_at == "auto":  # the gate saw every step, and priced each length it met
        summary = merged.gate.summary()
        assert summary["cost"] > 0 and sum(v["ran"] for v in summary["lengths"].values()) == sum(
            s.drafter_runs for s in stats)
    elif skip_at and settings.batch_size == 1:  # the tiny target repeats itself: the lookup covers some steps
        assert 0 < runs < 1.0
    else:  # a batch skips the drafter only where every row's guess is long enough
        assert runs == 1.0 or skip_at
