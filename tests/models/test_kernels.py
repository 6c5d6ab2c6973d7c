"""models/kernels.py: the few-row products (compiled and MKL's transposed one) equal F.linear to fp32 rounding,
apply only where they should, and are switched on and off per block (the benchmark's before/after) without
leaving anything patched."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import models.kernels as kernels
from models.kernels import FEW_ROWS, compiled_module, compiled_product, few_row_linear, few_row_linears

needs_compiled = pytest.mark.skipif(compiled_module() is None, reason="the compiled few-row product cannot be built "
                                    "on this machine (needs x86-64 with AVX2 and a C++ compiler); MKL's is tested")


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "mkl"])
def test_the_few_row_product_is_f_linear(compiled):
    weight, bias = torch.randn(301, 64), torch.randn(301)  # an odd row count: the compiled tiles' remainder
    shapes = [(rows, 64) for rows in range(1, FEW_ROWS + 2)] + [(2, 5, 64), (3, 4, 64)]  # every padding case
    with compiled_product(compiled):
        for shape in shapes:
            x = torch.randn(*shape)
            assert torch.allclose(few_row_linear(x, weight, bias), F.linear(x, weight, bias), atol=1e-5)
            assert few_row_linear(x, weight).shape == (*shape[:-1], 301)


@needs_compiled
def test_the_compiled_product_gives_a_row_the_same_bits_whatever_shares_its_call(monkeypatch):
    """A plain step (1 row) and a verification (γ + 1 rows) must score a token identically, so each output is one
    sum in a fixed order; and the compiled product is what runs (not the MKL fallback)."""
    weight = torch.randn(1000, 576)
    rows = torch.randn(16, 576)
    alone = torch.cat([few_row_linear(rows[i: i + 1], weight) for i in range(16)])
    for count in range(2, 17):
        assert torch.equal(few_row_linear(rows[:count], weight), alone[:count])
    monkeypatch.setattr(torch, "mm", lambda *args: pytest.fail("MKL's product ran instead of the compiled one"))
    few_row_linear(rows[:5], weight)


def test_shapes_the_compiled_product_cannot_take_fall_back_to_mkl(monkeypatch):
    """An inner dimension that is not a multiple of the vector width, a weight that is a strided view, or no
    compiled module at all (no compiler): MKL's transposed product, same results."""
    for weight in (torch.randn(40, 60), torch.randn(80, 64)[::2]):
        x = torch.randn(3, weight.shape[1])
        assert torch.allclose(few_row_linear(x, weight), F.linear(x, weight), atol=1e-5)
    monkeypatch.setattr(kernels, "_compiled_module", [None])
    x, weight = torch.randn(5, 64), torch.randn(30, 64)
    assert torch.allclose(few_row_linear(x, weight), F.linear(x, weight), atol=1e-5)


def test_a_machine_without_a_compiler_is_told_once_and_decodes_on(monkeypatch, tmp_path, capsys):
    """The build fails (here: no compiler on PATH): one line on stderr saying why and what runs instead."""
    monkeypatch.setattr(kernels, "_compiled_module", [])
    monkeypatch.setenv("DRAFTSMITH_KERNEL_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("this CPU has no instruction set the compiled product is written for: nothing is attempted")
    assert compiled_module() is None and compiled_module() is None
    said = capsys.readouterr().err
    assert said.count("compiled few-row product is unavailable") == 1 and "MKL's transposed product" in said
    x, weight = torch.randn(5, 64), torch.randn(30, 64)
    assert torch.allclose(few_row_linear(x, weight), F.linear(x, weight), atol=1e-5)


def test_the_patch_covers_every_linear_and_is_undone():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    x = torch.randn(2, 8)
    expected = model(x)
    with few_row_linears(model):
        assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
        assert torch.allclose(model(x), expected, atol=1e-6)
        with few_row_linears(model):  # nested: harmless
            pass
        assert all("forward" in m.__dict__ for m in model if isinstance(m, torch.nn.Linear))
    assert not any("forward" in m.__dict__ for m in model)
    with few_row_linears(active=False):  # an explicit "off" holds for the blocks inside it
        with few_row_linears(model):
            assert not any("forward" in m.__dict__ for m in model)


def test_a_draft_vocabulary_head_decodes_through_the_kernel_and_trains_through_f_linear(monkeypatch):
    """The reduced head is no nn.Linear; it names its product (`FEW_ROW_METHOD`), so the decoder's patch reaches it
    inside a block over the drafter, as it reaches the layers, follows the same on/off switch, and leaves it as it
    was outside (training: F.linear, gradients as ever)."""
    from models.drafter import ReducedVocabHead
    head = ReducedVocabHead(64, torch.arange(0, 600, 2), vocab_size=600)
    drafter = torch.nn.Sequential(torch.nn.Linear(64, 64), head)
    torch.nn.init.normal_(head.weight)
    x = torch.randn(1, 64)
    calls = []
    monkeypatch.setattr(kernels, "few_row_linear", lambda *args: calls.append(args) or few_row_linear(*args))
    with torch.no_grad(), few_row_linears(drafter):
        decoded = head.compact(x)
        assert len(calls) == 1 and torch.allclose(decoded, F.linear(x, head.weight), atol=1e-5)
        full = head(x)
        assert len(calls) == 2 and torch.isinf(full[:, 1::2]).all() and torch.allclose(full[:, ::2], decoded, atol=1e-5)
    with torch.no_grad(), few_row_linears(active=False), few_row_linears(drafter):  # the benchmark's "before" side
        head.compact(x)
    assert len(calls) == 2 and "compact" not in head.__dict__
    head.compact(x).sum().backward()  # outside any block: F.linear
    assert len(calls) == 2 and head.weight.grad is not None


def test_grouped_query_attention_runs_without_copied_heads_and_gives_the_same_logits(monkeypatch):
    """Inside the block transformers' SDPA attends over the grouped key/value heads as they are (enable_gqa, with a
    mask too); the logits are those of the copied-heads path outside it, and the switch is put back on exit."""
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers.integrations.sdpa_attention as sdpa

    monkeypatch.delenv(kernels.GROUPED_ATTENTION, raising=False)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 9))
    mask = torch.ones(1, 1, 9, 9, dtype=torch.bool).tril()
    copies = []
    monkeypatch.setattr(sdpa, "repeat_kv", lambda x, n: copies.append(n) or x.repeat_interleave(n, 1))
    with torch.no_grad():
        outside = model(ids, attention_mask=mask).logits
        assert copies  # the masked path copies the key/value heads out of the block
        copies.clear()
        with few_row_linears(model):
            inside = model(ids, attention_mask=mask).logits
        assert not copies
    assert torch.allclose(inside, outside, atol=1e-5)
    assert kernels.GROUPED_ATTENTION not in os.environ


@needs_compiled
@pytest.mark.parametrize("damage", ["truncated", "emptied", "unrecorded"])
def test_a_damaged_kernel_library_is_never_loaded_but_moved_aside_and_rebuilt(tmp_path, damage):
    """A library that is not, to the byte, what its build loaded (cut to 100 kB, emptied, or without the build's
    record of size and sha256) is named, moved aside and built again before anything loads it: a truncated library
    loaded would take the process down (SIGBUS). Run in a child process, so a failure here cannot end the suite; the
    child's build copies the good build (a real build takes a minute)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import REPO_ROOT

    good = Path(compiled_module().__file__)
    folder = tmp_path / good.parent.name
    shutil.copytree(good.parent, folder)
    library = folder / good.name
    if damage == "truncated":
        library.write_bytes(good.read_bytes()[:100_000])
    elif damage == "emptied":
        library.write_bytes(b"")
    else:
        library.with_name(library.name + ".json").unlink()
    script = ("import shutil, sys\nimport models.kernels as kernels\n"
              "kernels._build = lambda name, isa, folder: shutil.copytree(sys.argv[1], folder)\n"
              "print('loaded' if kernels.compiled_module() is not None else 'not loaded')\n")
    done = subprocess.run([sys.executable, "-c", script, str(good.parent)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env={**os.environ, "DRAFTSMITH_KERNEL_DIR": str(tmp_path)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "loaded" and f"{library}" in done.stderr and "moved aside to" in done.stderr
    assert (tmp_path / f"{folder.name}.damaged").is_dir() and library.read_bytes() == good.read_bytes()
