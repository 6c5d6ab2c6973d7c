"""Matrix products of a few rows at their true cost on a CPU.

Decoding multiplies a handful of rows (1 for a plain step, γ + 1 or a tree's nodes for a verification) by large
weight matrices. On this project's CPUs (MKL, AVX2), `F.linear(x, W)` (x @ Wᵀ) for 2-8 rows costs about twice what
it costs for one row, while the same product computed as (W @ xᵀ)ᵀ costs no more than one row does: for SmolLM2's
576×49,152 LM head, 9.5 ms at 1 row either way, and at 4 rows 17.2 ms (F.linear) against 3.8 ms; for the
1536×576 MLP matrix 0.19 against 0.13 ms (torch 2.13, 2 threads, best of 3 medians; `bench/verify_cost.py`
measures the whole forward both ways). The library picks a poor kernel for that shape; the hardware is not the
limit. Inside the whole model, where each weight is read from memory once per forward, the transposed product wins
for every matrix up to 16 rows, and a 2-row product is even cheaper than MKL's 1-row one, so a single row is padded
with a zero row (SmolLM2-135M fp32 forward after 300 tokens, ms, F.linear → this: 1 token 46 → 30, 4 tokens 76 → 34,
8 tokens 86 → 56, 16 tokens 115 → 71; the machine's noise is ±15%). Measured choice (`transposed_product`): (W @ xᵀ)ᵀ
for 1-16 rows; F.linear for more rows (training batches, prefill) and on GPUs. MKL's cost for that product is not
monotone in the row count: with the weights streamed from memory as in a real forward (30 copies of SmolLM2's layer
matrices cycled, best of 5), 7 rows cost 44.9 ms against 38.6 at 8, and 12 rows 57.0 against 41.9-44.6 at 16, so the
rows are padded with zero rows up to the next of `PADDED_ROWS` (a verification of 12 tree nodes: v 2.73 → 2.42).
The rule is fixed, not tuned per run, so results are reproducible.

Also measured on this CPU and not taken (DRAM-bound loop above, ms for 1 / 5 / 16 rows): oneDNN's
`mkldnn::_linear_pointwise` 25.7 / 32.9 / 41.6 (against 14.9 / 36.5 / 41.9 here: flat, but worse where decoding
lives); MKL's packed `_mkl_linear` for the LM head about 15.9 at every width (against 4-5 at 2-5 rows here);
inductor's C++ micro-GEMM (torch.compile, max-autotune, frozen weights) halves the 5-row cost of the layer matrices
(22.1 → 11.2 ms) but only with the weights frozen into a graph compiled per width (67 s to compile 90 matrices), which
a decoder whose widths and cache lengths change every step cannot use; a hand-written AVX-512 loop on one thread was
slower than MKL on two (43.8 / 60.2 / 80.0).

`few_row_linears(model, ...)` makes every `nn.Linear` of the given models (the LM head included), and every module
naming a `FEW_ROW_METHOD` that multiplies its input by its `weight` (a drafter's draft-vocabulary head), compute that
way inside a block; the decoder applies it to plain and speculative decoding alike, so every speedup compares like
with like. Results agree with `F.linear` to fp32 rounding (the sums are ordered differently).
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

FEW_ROWS = 16
PADDED_ROWS = (2, 4, 5, 6, 8, 16)  # row counts MKL's (W @ xᵀ)ᵀ handles at their cost; others pad up to the next
ENV_SWITCH = "DRAFTSMITH_FEW_ROW_KERNEL"  # "0": plain F.linear everywhere (for before/after measurements)


def transposed_product(rows: int, out_features: int, in_features: int) -> bool:
    """Whether (W @ xᵀ)ᵀ beats F.linear for `rows` rows of this matrix on a CPU (measured, see above)."""
    return 1 <= rows <= FEW_ROWS


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), computed as (W @ xᵀ)ᵀ where `transposed_product` says it is faster; the rows
    are padded with zero rows up to the next of `PADDED_ROWS` (a 2-row product costs less than MKL's 1-row one, an
    8-row one less than 7 rows)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != weight.dtype or not transposed_product(rows, *weight.shape):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    padded = next(count for count in PADDED_ROWS if count >= rows)
    if padded > rows:
        flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
    out = torch.mm(weight, flat.T)[:, :rows].T.contiguous()  # fused attention needs stride-1 rows
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_chosen: list[bool] = []  # explicit choices of enclosing blocks, innermost last


def enabled() -> bool:
    """Whether a block without an explicit choice uses the kernel: the innermost explicit choice, else the
    environment switch (on unless DRAFTSMITH_FEW_ROW_KERNEL=0)."""
    return _chosen[-1] if _chosen else os.environ.get(ENV_SWITCH, "1") != "0"


@contextlib.contextmanager
def few_row_linears(*models: torch.nn.Module, active: bool | None = None):
    """Within the block, every nn.Linear of `models`, and the `FEW_ROW_METHOD` (x -> x Wᵀ) of any module naming one,
    computes through `few_row_linear`. `active` None follows `enabled()`; an explicit True/False also decides for the
    blocks nested inside (a benchmark's "before" run switches it off for the decoder's own blocks). Nested or
    repeated use is harmless."""
    if active is not None:
        _chosen.append(active)
    patched = []
    if enabled():
        for model in models:
            for module in model.modules() if isinstance(model, torch.nn.Module) else ():
                name = "forward" if isinstance(module, torch.nn.Linear) else getattr(module, "FEW_ROW_METHOD", None)
                if name and name not in module.__dict__:
                    setattr(module, name, _bound(module))
                    patched.append((module, name))
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)
        if active is not None:
            _chosen.pop()


def _bound(module: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, module.weight, getattr(module, "bias", None))
    return forward
