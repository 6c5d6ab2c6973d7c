"""Chat-template helpers: the exact token ids a target sees, and which of them are the assistant's.

The assistant-only loss mask is derived from the target's own chat template, not from a hard-coded format:
rendering the conversation up to turn i with the generation prompt, then up to and including turn i, brackets
the characters the template spends on assistant turn i. Token offsets map those characters to tokens, and the
mask keeps the turn's tokens up to and including the first end-of-turn token (what the model itself emits; a
newline the template adds after it is not). Works for ChatML (SmolLM2), Llama-3 and any append-only template.
"""
from __future__ import annotations

from transformers import GenerationConfig, PreTrainedTokenizerBase


class ChatTemplateError(ValueError):
    pass


def has_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer, once it is known to have a chat template; a base model's is refused with what to set."""
    if not tokenizer.chat_template:
        raise ChatTemplateError(f"the target's tokenizer ({tokenizer.name_or_path}) has no chat template (a base "
                                "model): set target.chat_template=plain to continue the turns as text, or give "
                                "target.chat_template a Jinja template")
    return tokenizer


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> str:
    return has_template(tokenizer).apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                       tokenize=False)


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                   add_generation_prompt: bool = False) -> list[int]:
    """Token ids of `messages` rendered by the chat template (transformers may return a list or an encoding)."""
    encoded = has_template(tokenizer).apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                          tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def prompt_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The exact ids the target sees before it starts answering."""
    return chat_token_ids(tokenizer, messages, add_generation_prompt=True)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase, generation_config: GenerationConfig | None = None) -> list[int]:
    """Token ids that end an answer: the tokenizer's eos plus whatever the generation config lists
    (`model.generation_config`, or one read from the model's folder when only vLLM holds the model)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def cut_at_end_of_turn(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], str]:
    """Response tokens up to and including the first stop token; finish reason 'stop' or 'length'."""
    for index, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[: index + 1], "stop"
    return tokens, "length"


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant message, the [start, end) characters the template spends on it."""
    text = render(tokenizer, messages, add_generation_prompt)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:index], add_generation_prompt=True)
        through = render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ChatTemplateError(
                f"the chat template is not append-only at assistant turn {index} (rendering a longer "
                f"conversation changes the text of earlier turns), so earlier turns cannot be masked; "
                f"use data_gen.turns=first or last with this target")
        spans.append((len(before), len(through)))
    return text, spans


def assistant_token_mask(tokenizer: PreTrainedTokenizerBase, messages: list[dict], stop_ids: list[int],
                         add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and a mask that is 1 exactly on each assistant turn's tokens up to
    and including its first end-of-turn token."""
    text, spans = assistant_spans(tokenizer, messages, add_generation_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), encoded["offset_mapping"]
    if ids != chat_token_ids(tokenizer, messages, add_generation_prompt):
        raise ChatTemplateError("tokenizing the rendered chat text does not reproduce apply_chat_template's ids")
    mask = [0] * len(ids)
    for start, end in spans:
        inside = [i for i, (a, b) in enumerate(offsets) if a >= start and b <= end and b > a]
        straddling = [i for i, (a, b) in enumerate(offsets) if a < start < b or a < end < b]
        if straddling:
            raise ChatTemplateError(f"token {straddling[0]} crosses the boundary of an assistant turn "
                                    f"(characters {start}..{end}); its loss mask would be ambiguous")
        for i in inside:
            mask[i] = 1
            if ids[i] in stop_ids:
                break
    return ids, mask


def document_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """A corpus document's token ids: plain text (one message of role "text", `corpus.format=text`) then the end of
    sequence, or a conversation in the chat template."""
    if messages[0]["role"] == "text":
        return tokenizer(messages[0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return chat_token_ids(tokenizer, messages)
