"""Token-level drafters (models/drafter.py): built for a target's vocabulary, initialised from its embeddings or
layers, with an optional reduced draft vocabulary; another vocabulary is refused."""
from __future__ import annotations

import pytest
import torch

from models.drafter import DrafterSpec, VocabularyMismatchError, build_drafter, check_same_vocabulary, count_parameters


def test_drafter_from_target_embeddings_has_target_vocab_and_budget(real_target):
    spec = DrafterSpec(name="d", hidden_size=192, num_layers=4, num_heads=3, num_kv_heads=1, intermediate_size=512,
                       init="target_embeddings")
    drafter = build_drafter(spec, real_target.model, real_target.tokenizer)
    assert drafter.config.vocab_size == real_target.model.config.vocab_size
    assert count_parameters(drafter) <= 0.10 * count_parameters(real_target.model)
    # the projected embedding keeps the target's token geometry: nearest neighbours largely agree
    source = real_target.model.get_input_embeddings().weight[:2000]
    projected = drafter.get_input_embeddings().weight[:2000].detach()
    def neighbours(matrix):
        normed = torch.nn.functional.normalize(matrix - matrix.mean(0), dim=-1)
        return (normed @ normed.T).fill_diagonal_(-2).argmax(-1)
    assert (neighbours(source) == neighbours(projected)).float().mean() > 0.3


def test_vocabulary_mismatch_names_both_sizes(tiny_target):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(VocabularyMismatchError, match="has 300 entries but the target's has 259"):
        check_same_vocabulary(other, tiny_target.model)


def test_target_layers_init_copies_the_target_exactly_at_full_size_and_projects_when_narrower(tiny_target):
    from dataclasses import replace

    model, tokenizer = tiny_target.model, tiny_target.tokenizer
    config = model.config
    full = DrafterSpec(name="copy", hidden_size=config.hidden_size, num_layers=config.num_hidden_layers,
                       num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                       intermediate_size=config.intermediate_size, init="target_layers",
                       tie_embeddings=config.tie_word_embeddings)
    probe = torch.tensor([[3, 17, 42, 99, 7, 250]])
    with torch.no_grad():
        copy = build_drafter(full, model, tokenizer)
        assert torch.allclose(copy(probe).logits, model(probe).logits, atol=1e-5)
        assert build_drafter(replace(full, num_layers=1), model, tokenizer).config.copied_target_layers == [0]
        narrow = build_drafter(replace(full, hidden_size=32, num_layers=1), model, tokenizer)
        assert torch.isfinite(narrow(probe).logits).all()
    # the narrow copy lives in a 32-dimensional orthonormal projection of the target's hidden space
    embeddings, projected = model.get_input_embeddings().weight, narrow.get_input_embeddings().weight
    basis = torch.linalg.lstsq(embeddings, projected).solution  # [64, 32]
    assert torch.allclose(embeddings @ basis, projected, atol=1e-4)
    assert torch.allclose(basis.T @ basis, torch.eye(32), atol=1e-3)
    layer, their_layer = narrow.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight
    assert torch.allclose(layer, their_layer @ basis, atol=1e-4)
    with pytest.raises(ValueError, match=r"drafter.num_heads=2 \(target 4\)"):
        build_drafter(replace(full, num_heads=2, num_kv_heads=2), model, tokenizer)


def test_frequent_tokens_keep_specials_and_the_most_common():
    from models.drafter import frequent_tokens

    d2t, coverage = frequent_tokens([[5, 5, 5, 7, 7, 9], [5, 7, 11]], size=3, always=[0])
    assert d2t.tolist() == [0, 5, 7] and coverage == pytest.approx(7 / 9)
