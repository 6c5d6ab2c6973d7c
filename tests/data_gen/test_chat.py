"""The assistant-only loss mask marks exactly what the chat template renders as assistant content (plus the
end-of-turn token), for SmolLM2's own template and for a Llama-3-style template."""
from __future__ import annotations

import pytest

from data_gen.chat import ChatTemplateError, assistant_token_mask, end_of_turn_ids
from models.tiny import byte_chatml_tokenizer

# Llama 3's layout: header tokens around the role, the content trimmed, <|eot_id|> ending every turn.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4.\n\nAnything else?"},
    {"role": "user", "content": "Why is the sky blue? Explain ünïcödé too."},
    {"role": "assistant", "content": "Rayleigh scattering: short wavelengths scatter more. 🌈"},
]


def llama3_style_tokenizer():
    tokenizer = byte_chatml_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|begin_of_text|>", "<|start_header_id|>",
                                                                "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.eos_token = "<|eot_id|>"
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    spans, current = [], []
    for token, flag in zip(ids, mask):
        if flag:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def check_mask(tokenizer, stop_ids):
    ids, mask = assistant_token_mask(tokenizer, CONVERSATION, stop_ids)
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    spans = masked_spans(ids, mask)
    assert [tokenizer.decode(span) for span in spans] == [a + tokenizer.eos_token for a in answers]
    assert all(span[-1] in stop_ids and sum(t in stop_ids for t in span) == 1 for span in spans)
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for message in CONVERSATION:
        assert (message["content"] in unmasked) == (message["role"] != "assistant")
    # with a generation prompt the mask is unchanged and the prompt tail is unmasked
    prompt_ids, prompt_mask = assistant_token_mask(tokenizer, CONVERSATION[:4], stop_ids, add_generation_prompt=True)
    assert masked_spans(prompt_ids, prompt_mask) == spans[:1] and prompt_mask[-1] == 0


def test_mask_for_smollm2_template(real_target):
    tokenizer = real_target.tokenizer
    assert "<|im_start|>" in tokenizer.chat_template
    check_mask(tokenizer, end_of_turn_ids(tokenizer, real_target.model.generation_config))


def test_mask_for_llama3_style_template():
    tokenizer = llama3_style_tokenizer()
    check_mask(tokenizer, end_of_turn_ids(tokenizer))


def test_template_that_rewrites_history_is_refused():
    tokenizer = byte_chatml_tokenizer()
    # drops earlier assistant turns when a later one exists, as some reasoning-model templates do
    tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                               "{{ m['role'] + ': ' + m['content'] + '<|im_end|>' }}{% endif %}{% endfor %}"
                               "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    with pytest.raises(ChatTemplateError, match="not append-only at assistant turn 2"):
        assistant_token_mask(tokenizer, CONVERSATION, [tokenizer.eos_token_id])


def test_a_base_model_is_refused_without_a_template_and_continues_text_with_the_plain_one():
    """A tokenizer without a chat template (Gemma 3 270M's, a base model) is refused with the key to set; with
    target.chat_template=plain the turns are text one after another, and each assistant turn's mask is exactly its
    text (a base model ends nothing with an end-of-turn token)."""
    from data_gen.chat import prompt_token_ids
    from models.loading import PLAIN_TEMPLATE

    tokenizer = byte_chatml_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="target.chat_template=plain"):
        prompt_token_ids(tokenizer, CONVERSATION[:2])
    tokenizer.chat_template = PLAIN_TEMPLATE
    ids, mask = assistant_token_mask(tokenizer, CONVERSATION, [tokenizer.eos_token_id])
    answers = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tokenizer.decode(span) for span in masked_spans(ids, mask)] == answers
    prompt = tokenizer.decode(prompt_token_ids(tokenizer, CONVERSATION[:2]))
    assert prompt == tokenizer.bos_token + "You are terse.\n\nWhat is 2+2?\n\n"
