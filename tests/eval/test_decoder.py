"""Losslessness of the speculative decoder, three ways (ANCHORS.md §0.3), plus its counting.

1. Greedy: token-for-token equal to plain greedy decoding in fp32 (tiny models here, real SmolLM2 below and on
   every benchmark prompt in the eval stage).
2. Half precision: every divergence from plain decoding is classified as a near-tie of the target's top-2 logits
   or not (`eval.speculative.classify_divergence`).
3. Sampling: chi-square tests of the generated sequences against the target's exact (warped) distribution,
   enumerated over all V^L continuations of tiny synthetic models, jointly and per position; a deliberately
   biased acceptance rule and the classic wrong residual must be caught by the same tests (negative controls).
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import eval.decoder as decoder
from data_gen.chat import end_of_turn_ids, prompt_token_ids
from eval.decoder import DecodeSettings, plain_generate, speculative_generate
from models.drafter import DrafterSpec, TokenDraft, build_drafter
from models.sampling import SamplingSettings, warp_logits
from tests.conftest import chi_square_p_value

VOCAB, LENGTH, PROMPT, SAMPLES = 5, 3, [1, 2], 6000


def synthetic_pair() -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """A random 5-token target with peaked but not degenerate distributions, and a drafter that is the target
    with a perturbed head (so drafts are accepted about half the time: both branches of the rule run)."""
    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    target = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        target.lm_head.weight.mul_(0.75 / target.lm_head.weight.std())
    drafter = copy.deepcopy(target)
    with torch.no_grad():
        drafter.lm_head.weight.add_(torch.randn(drafter.lm_head.weight.shape) * 0.6)
    return target, drafter


@pytest.fixture(scope="module")
def pair():
    return synthetic_pair()


def exact_distribution(target, settings: DecodeSettings) -> tuple[list[list[int]], torch.Tensor]:
    """Every continuation of LENGTH tokens and its probability under the warped target."""
    sequences = [list(s) for s in itertools.product(range(VOCAB), repeat=LENGTH)]
    with torch.no_grad():
        logits = target(torch.tensor([PROMPT + s for s in sequences])).logits[:, len(PROMPT) - 1: -1]
    log_probs = torch.log_softmax(warp_logits(logits.reshape(-1, VOCAB), settings.sampling), -1)
    log_probs = log_probs.view(len(sequences), LENGTH, VOCAB)
    return sequences, log_probs.gather(2, torch.tensor(sequences)[..., None])[..., 0].sum(1).exp()


def sampled_p_values(target, draft, settings: DecodeSettings) -> dict[str, float]:
    sequences, exact = exact_distribution(target, settings)
    generations = speculative_generate(target, draft, [PROMPT] * SAMPLES, settings, stop_ids=[],
                                       keys=[f"sample-{i}" for i in range(SAMPLES)])
    joint = torch.zeros(len(sequences))
    for generation in generations:
        joint[sequences.index(generation.tokens)] += 1
    table = torch.tensor(sequences)
    values = {"joint": chi_square_p_value(joint, exact)}
    for position in range(LENGTH):
        marginal_counts = torch.zeros(VOCAB).index_add_(0, table[:, position], joint)
        marginal_exact = torch.zeros(VOCAB).index_add_(0, table[:, position], exact)
        values[f"position {position + 1}"] = chi_square_p_value(marginal_counts, marginal_exact)
    accepted = sum(g.stats.accepted for g in generations) / sum(g.stats.drafted for g in generations)
    assert 0.2 < accepted < 0.95, f"acceptance {accepted}: the test needs both accepted and rejected drafts"
    return values


T = SamplingSettings


def sampled(**settings) -> DecodeSettings:
    return DecodeSettings(max_new_tokens=LENGTH, batch_size=1000, **settings)


SAMPLED = {
    "chain γ=2, T=0.9, top-k 4": sampled(gamma=2, sampling=T(temperature=0.9, top_k=4)),
    "chain γ=3, T=1.3, top-p 0.9": sampled(gamma=3, sampling=T(temperature=1.3, top_p=0.9)),
    "adaptive chain, threshold 0.4": sampled(gamma=3, sampling=T(temperature=1.0), confidence_threshold=0.4),
    "tree (2, 2)": sampled(tree=(2, 2), sampling=T(temperature=1.0)),
    "tree (3, 1, 2), top-k 3": sampled(tree=(3, 1, 2), sampling=T(temperature=0.8, top_k=3)),
}


@pytest.mark.parametrize("name", list(SAMPLED))
def test_sampled_output_follows_the_target_distribution(pair, name):
    target, drafter = pair
    p_values = sampled_p_values(target, TokenDraft(drafter), SAMPLED[name])
    assert min(p_values.values()) > 1e-3, p_values


@pytest.mark.parametrize("shape", [{"gamma": 3}, {"tree": (2, 1)}], ids=["chain", "tree"])
def test_sampling_with_a_training_free_drafter_follows_the_target_distribution(pair, shape):
    """A lookup drafter's q is sparse (-inf off its candidates) and it abstains where nothing matches (the row
    stops drafting): neither may bend the output away from the target's distribution."""
    from models.lookup import LookupDraft, LookupSpec, build_lookup_drafter

    target, _ = pair
    corpus = [[1, 2, 3, 1, 2, 4, 2, 0], [2, 1, 2, 3, 3]]  # some contexts match, others do not
    drafter = build_lookup_drafter(LookupSpec(sources=("prompt", "corpus"), max_ngram=2), VOCAB, corpus)
    p_values = sampled_p_values(target, LookupDraft(drafter), sampled(sampling=T(temperature=1.0), **shape))
    assert min(p_values.values()) > 1e-3, p_values


@pytest.mark.parametrize("shape", [{"gamma": 3}, {"tree": (2, 1)}], ids=["chain", "tree"])
def test_sampling_with_a_trained_drafter_behind_a_lookup_follows_the_target_distribution(pair, shape):
    """eval.hybrid: the lookup's candidates lifted above the trained drafter's logits where it matches, the
    trained drafter's distribution elsewhere: q changes from node to node, the output distribution may not."""
    from models.lookup import LookupDraft, LookupFirstDraft, LookupSpec, build_lookup_drafter

    target, drafter = pair
    lookup = LookupDraft(build_lookup_drafter(LookupSpec(sources=("prompt",), max_ngram=2), VOCAB))
    p_values = sampled_p_values(target, LookupFirstDraft(lookup, TokenDraft(drafter)),
                                sampled(sampling=T(temperature=1.0), **shape))
    assert min(p_values.values()) > 1e-3, p_values


@pytest.mark.parametrize("shape, pruned", [({"gamma": 2}, 0.0), ({"tree": (2, 1)}, 0.0), ({"tree": (3, 2)}, 0.1)],
                         ids=["chain", "tree", "pruned tree"])
def test_sampling_from_a_merged_tree_follows_the_target_distribution(pair, shape, pruned):
    """eval.merged: the lookup's branch and the trained drafter's own (sharing nodes where they agree) verified
    as one general tree per row, every node's children tried in turn: the output stays the target's."""
    from models.lookup import LookupDraft, LookupSpec, MergedDraft, build_lookup_drafter

    target, drafter = pair
    corpus = [[1, 2, 3, 1, 2, 4, 2, 0], [2, 1, 2, 3, 3]]
    lookup = LookupDraft(build_lookup_drafter(LookupSpec(sources=("prompt", "corpus"), max_ngram=2), VOCAB, corpus))
    p_values = sampled_p_values(target, MergedDraft(lookup, TokenDraft(drafter), depth=3, min_probability=pruned),
                                sampled(sampling=T(temperature=1.0), **shape))
    assert min(p_values.values()) > 1e-3, p_values


def test_negative_control_a_general_tree_that_keeps_rejected_mass_is_caught(pair, monkeypatch):
    """The merged tree's rule without removing a rejected child's mass (resampling from p instead of what is left
    of it) must fail the same test."""
    from models.lookup import LookupDraft, LookupSpec, MergedDraft, build_lookup_drafter

    monkeypatch.setattr(decoder, "without", lambda left, token: None)
    target, drafter = pair
    corpus = [[1, 2, 3, 1, 2, 4, 2, 0], [2, 1, 2, 3, 3]]
    lookup = LookupDraft(build_lookup_drafter(LookupSpec(sources=("prompt", "corpus"), max_ngram=2), VOCAB, corpus))
    p_values = sampled_p_values(target, MergedDraft(lookup, TokenDraft(drafter), depth=3),
                                sampled(sampling=T(temperature=1.0), tree=(2, 1)))
    assert p_values["joint"] < 1e-6, p_values


@pytest.mark.parametrize("bias", ["acceptance", "residual"])
def test_negative_control_biased_rules_are_caught(pair, monkeypatch, bias):
    """The same chi-square tests must reject a decoder that is subtly wrong: one that accepts a little too
    often, or one that resamples from p instead of the residual (p - q)_+ after a rejection."""
    if bias == "acceptance":
        monkeypatch.setattr(decoder, "accepts", lambda draws, p, q: draws * q <= 1.25 * p)
    else:
        monkeypatch.setattr(decoder, "residual", lambda p, q: p)
    target, drafter = pair
    p_values = sampled_p_values(target, TokenDraft(drafter), SAMPLED["chain γ=2, T=0.9, top-k 4"])
    assert p_values["joint"] < 1e-6, p_values


def test_sampling_is_reproducible_and_independent_of_the_batch(pair):
    target, drafter = pair
    settings = DecodeSettings(gamma=3, sampling=SamplingSettings(temperature=1.0), max_new_tokens=6)
    keys = [f"k{i}" for i in range(6)]
    one_by_one = speculative_generate(target, TokenDraft(drafter), [PROMPT] * 6, settings, [], keys)
    batched = speculative_generate(target, TokenDraft(drafter), [PROMPT] * 6,
                                   DecodeSettings(gamma=3, sampling=T(temperature=1.0), max_new_tokens=6,
                                                  batch_size=4), [], keys)
    assert [g.tokens for g in one_by_one] == [g.tokens for g in batched]
    assert len({tuple(g.tokens) for g in one_by_one}) > 1  # different keys, different draws


# ---- greedy -----------------------------------------------------------------------------------------------------

GREEDY = {
    "chain γ=1": DecodeSettings(gamma=1, max_new_tokens=40),
    "chain γ=4": DecodeSettings(gamma=4, max_new_tokens=40),
    "chain γ=7, batch 3": DecodeSettings(gamma=7, max_new_tokens=40, batch_size=3),
    "adaptive, batch 2": DecodeSettings(gamma=5, confidence_threshold=0.3, max_new_tokens=40, batch_size=2),
    "tree (3, 2, 1)": DecodeSettings(tree=(3, 2, 1), max_new_tokens=40),
    "tree (2, 2), batch 3": DecodeSettings(tree=(2, 2), max_new_tokens=40, batch_size=3),
}


def tiny_prompts(tokenizer) -> list[list[int]]:
    return [prompt_token_ids(tokenizer, [{"role": "user", "content": text}])
            for text in ["Hello!", "Write a haiku about the sea.", "2+2="]]


def opposite_of(model):
    """The target with its head negated: its argmax is the target's argmin, so every greedy draft is rejected."""
    drafter = copy.deepcopy(model)
    with torch.no_grad():
        drafter.get_output_embeddings().weight.neg_()
    return drafter


@pytest.mark.parametrize("name", list(GREEDY))
def test_greedy_speculative_equals_plain_greedy_on_tiny_models(family_target, name):
    """In every family (Llama, Qwen2, Gemma 3 with a window shorter than the prompts): plain decoding equals HF's
    generate, and every drafter's output equals plain decoding."""
    model, tokenizer = family_target.model, family_target.tokenizer
    settings = GREEDY[name]
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    prompts = tiny_prompts(tokenizer)
    reference = plain_generate(model, prompts, DecodeSettings(max_new_tokens=40), stop_ids)
    hf = [model.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=stop_ids,
                         pad_token_id=tokenizer.pad_token_id)[0, len(p):].tolist() for p in prompts]
    assert reference == hf
    spec = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    for drafter in [build_drafter(spec, model, tokenizer).eval(), model, opposite_of(model)]:
        generations = speculative_generate(model, TokenDraft(drafter), prompts, settings, stop_ids)
        assert [g.tokens for g in generations] == reference
        assert all(g.stats.emitted == len(g.tokens) for g in generations)


def test_plain_decoding_keeps_the_targets_top_k_it_chose_each_token_from(tiny_target):
    """plain_generate_topk (the online stage's trace): the same tokens as plain decoding, and at every token the
    target's top-k log-probabilities, equal (fp32 rounding) to one full forward over prompt + answer; batched
    requests that stop at different lengths keep their own rows."""
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    prompts = tiny_prompts(tokenizer)
    settings = DecodeSettings(max_new_tokens=24, batch_size=len(prompts))
    stop_ids = stop_ids + [plain_generate(model, prompts[:1], settings, stop_ids)[0][5]]  # the first row stops early
    answers, ids, values = decoder.plain_generate_topk(model, prompts, settings, stop_ids, None, 5)
    assert answers == plain_generate(model, prompts, settings, stop_ids)
    assert len(answers[0]) <= 6 < max(len(a) for a in answers)
    for prompt, answer, top_ids, top_values in zip(prompts, answers, ids, values):
        assert len(top_ids) == len(top_values) == len(answer)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1: -1]
        expected = torch.log_softmax(logits.float(), -1).topk(5, -1)
        assert [row[0] for row in top_ids] == answer  # greedy: the chosen token is the top-1
        assert top_ids == expected.indices.tolist()
        torch.testing.assert_close(torch.tensor(top_values), expected.values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_a_perfect_drafter_emits_gamma_plus_one_per_target_forward(tiny_target, gamma):
    model = tiny_target.model
    steps = 4
    generation = speculative_generate(model, TokenDraft(model), [[5, 6, 7]],
                                      DecodeSettings(gamma=gamma, max_new_tokens=steps * (gamma + 1)), [])[0]
    metrics = generation.stats.metrics()
    assert generation.stats.steps == steps and metrics["block_efficiency"] == gamma + 1
    assert metrics["acceptance_rate"] == 1.0 and metrics["accepted_per_position"] == [1.0] * gamma


@pytest.mark.parametrize("gamma", [1, 4])
def test_a_drafter_that_is_always_wrong_emits_one_token_per_target_forward(tiny_target, gamma):
    model = tiny_target.model
    generation = speculative_generate(model, TokenDraft(opposite_of(model)), [[5, 6]],
                                      DecodeSettings(gamma=gamma, max_new_tokens=10), [])[0]
    metrics = generation.stats.metrics()
    assert generation.stats.steps == 10 and generation.stats.accepted == 0
    assert metrics["block_efficiency"] == 1.0 and metrics["conditional_acceptance_per_position"][0] == 0.0


def test_a_stop_token_inside_an_accepted_block_ends_the_row(tiny_target):
    model = tiny_target.model
    prompts = [[1, 2, 3], [4, 5]]
    free = plain_generate(model, prompts, DecodeSettings(max_new_tokens=12), [])
    stop = free[0][2]  # the first row's 3rd token
    reference = plain_generate(model, prompts, DecodeSettings(max_new_tokens=12), [stop])
    generations = speculative_generate(model, TokenDraft(model), prompts,
                                       DecodeSettings(gamma=4, max_new_tokens=12, batch_size=2), [stop])
    assert [g.tokens for g in generations] == reference
    assert generations[0].tokens[-1] == stop and generations[0].finished_by_stop


def test_adaptive_draft_length_drafts_less_when_the_drafter_is_unsure(tiny_target):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    prompts = tiny_prompts(tokenizer)
    fixed = speculative_generate(model, TokenDraft(model), prompts, DecodeSettings(gamma=5, max_new_tokens=30), [])
    adaptive = speculative_generate(model, TokenDraft(model), prompts,
                                    DecodeSettings(gamma=5, confidence_threshold=0.5, max_new_tokens=30), [])
    assert [g.tokens for g in adaptive] == [g.tokens for g in fixed]
    drafted = [sum(g.stats.drafted for g in run) / sum(g.stats.steps for g in run) for run in (fixed, adaptive)]
    assert drafted[1] < drafted[0]


def test_a_tree_accepts_at_least_what_its_first_branch_accepts(tiny_target):
    """From the same prefix, a top-k tree contains the greedy chain as its first branch, so its first step accepts
    at least as many tokens as the chain's; checked from 30 prefixes along the target's own greedy answers."""
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    noisy = copy.deepcopy(model)  # a drafter that is right some of the time
    with torch.no_grad():
        head = noisy.get_output_embeddings().weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(0)) * head.std() * 0.3)
    drafter = TokenDraft(noisy)
    prompts = tiny_prompts(tokenizer)
    answers = plain_generate(model, prompts, DecodeSettings(max_new_tokens=10), [])
    prefixes = [prompt + answer[:cut] for prompt, answer in zip(prompts, answers) for cut in range(10)]
    chain = speculative_generate(model, drafter, prefixes, DecodeSettings(gamma=3, max_new_tokens=4), [])
    tree = speculative_generate(model, drafter, prefixes, DecodeSettings(tree=(4, 4, 4), max_new_tokens=4), [])
    assert [g.tokens for g in tree] == [g.tokens for g in chain]
    firsts = [(t.stats.accepted_per_step[0], c.stats.accepted_per_step[0]) for t, c in zip(tree, chain)]
    assert all(t >= c for t, c in firsts)
    assert sum(t for t, _ in firsts) > sum(c for _, c in firsts), firsts
