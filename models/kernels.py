"""Matrix products of a few rows at their true cost on a CPU.

Decoding multiplies a handful of rows (1 for a plain step, γ + 1 or a tree's nodes for a verification) by large
weight matrices, each read from memory once per forward: on a CPU the cost should be the cost of streaming the
weights, whatever the row count up to a dozen. Two ways are used, both for plain and speculative decoding alike, so
every speedup compares like with like:

1. **The compiled product** (`models/few_rows.cpp`, built once per machine and instruction set on first use, AVX2
   or AVX-512, with `torch.utils.cpp_extension`): each weight row is read once and multiplied by every row of x
   while in registers, with a software prefetch into L2 a few kilobytes ahead. For SmolLM2-135M's 210 layer
   matrices and its 576×49,152 LM head (fp32, 2 threads, weights streamed from memory as in a forward, best of 5):
   19.6 / 19.6 / 19.5 / 19.8 / 21.9 ms at 1 / 2 / 4 / 5 / 8 rows: flat (16 rows: 42.5 against MKL's 84.5).
   Without the prefetch the same loop costs 17-20 ms at 1 row but 31 / 34 / 45 ms at 4 / 5 / 8 (the core stalls
   on memory once each weight row carries 4 or more rows of arithmetic). A row's result does not depend on the
   other rows of the call (one sum per output in a fixed order), so the target's logits for a token are the same
   bits in a 1-token step and in a verification.
2. **MKL, transposed** (where the compiled product cannot be built or applied, or `DRAFTSMITH_FEW_ROW_KERNEL=mkl`):
   on this project's CPUs (MKL, AVX2/AVX-512), `F.linear(x, W)` (x @ Wᵀ) for 2-8 rows costs about twice its one-row
   cost, while (W @ xᵀ)ᵀ costs about as much as one row: for SmolLM2's LM head 9.5 ms at 1 row either way, and
   at 4 rows 17.2 ms (F.linear) against 3.8 ms; the whole forward after 300 tokens, F.linear → this: 1 token
   46 → 30 ms, 4 tokens 76 → 34, 8 tokens 86 → 56, 16 tokens 115 → 71 (the machine's noise is ±15%). MKL's cost
   for that product is not monotone in the row count (7 rows 44.9 ms against 38.6 at 8, 12 rows 57.0 against
   41.9-44.6 at 16), so rows are padded with zero rows up to the next of `PADDED_ROWS`, and a 2-row product is
   cheaper than MKL's 1-row one; but 5 rows cost about 1.5 times 4 (v 1.56 at 5 tokens), which the compiled
   product removes.

The same block also lets transformers' SDPA attend over grouped key/value heads without copying them for every query
head (`GROUPED_ATTENTION`; it does so for one query token only otherwise): 2-4 ms less per 4-5-token verification
here, the same logits to the bit.

Both products apply to 1-16 rows (`transposed_product`); F.linear for more rows (training batches, prefill) and on GPUs.
The rule is fixed, not tuned per run, so results are reproducible. Also measured on this CPU and not taken (ms for
1 / 5 / 16 rows, DRAM-bound loop of SmolLM2's layer matrices): oneDNN's `mkldnn::_linear_pointwise` 25.7 / 32.9 /
41.6 (against MKL transposed 14.9 / 36.5 / 41.9); MKL's packed `_mkl_linear` for the LM head about 15.9 at every
width; inductor's C++ micro-GEMM (torch.compile, max-autotune, frozen weights) halves the 5-row cost of the layer
matrices (22.1 → 11.2 ms) but only with the weights frozen into a graph compiled per width (67 s to compile 90
matrices), which a decoder whose widths and cache lengths change every step cannot use.

`few_row_linears(model, ...)` makes every `nn.Linear` of the given models (the LM head included), and every module
naming a `FEW_ROW_METHOD` that multiplies its input by its `weight` (a drafter's draft-vocabulary head), compute that
way inside a block. Results agree with `F.linear` to fp32 rounding (the sums are ordered differently).
`DRAFTSMITH_FEW_ROW_KERNEL`: unset or "1" the compiled product where it builds, else MKL transposed; "mkl" MKL
transposed only; "0" plain F.linear everywhere (for before/after measurements).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from infra.integrity import DamagedFilesError, digests, move_aside, read_record, verify_files
from infra.rundir import write_atomically

FEW_ROWS = 16
PADDED_ROWS = (2, 4, 5, 6, 8, 16)  # row counts MKL's (W @ xᵀ)ᵀ handles at their cost; others pad up to the next
ENV_SWITCH = "DRAFTSMITH_FEW_ROW_KERNEL"  # "0": plain F.linear everywhere; "mkl": no compiled product
SOURCE = Path(__file__).with_name("few_rows.cpp")
# transformers' switch for SDPA's enable_gqa with an attention mask (it uses it only without one otherwise, and
# copies the key/value heads for every query head: [1, 3, 3, 303, 64] twice per layer at 4 tokens, 2 ms of a
# 40 ms verification here); the result is the same to the bit (SmolLM2, 4-token block after 300 tokens)
GROUPED_ATTENTION = "TRANSFORMERS_SDPA_FORCE_GQA"
_ISA_FLAGS = {"AVX512": ["-mavx512f", "-mavx2", "-mfma"], "AVX2": ["-mavx2", "-mfma"]}
_BUILD_FAILURES = ("error:", "not found", "No such file", "Ninja is required", "Permission denied")
_compiled_module: list = []  # [module or None] once decided
_compiled_off: list[bool] = []  # explicit choices of enclosing `compiled_product` blocks, innermost last


def transposed_product(rows: int, out_features: int, in_features: int) -> bool:
    """Whether (W @ xᵀ)ᵀ beats F.linear for `rows` rows of this matrix on a CPU (measured, see above)."""
    return 1 <= rows <= FEW_ROWS


def kernel_directory() -> Path:
    """Where the compiled product is built: $DRAFTSMITH_KERNEL_DIR, else ~/.cache/draftsmith/kernels."""
    return Path(os.environ.get("DRAFTSMITH_KERNEL_DIR", Path.home() / ".cache" / "draftsmith" / "kernels"))


def compiled_module():
    """The compiled product's module (`models/few_rows.cpp`), built on first use, once per machine, instruction set,
    source and torch version; None where it cannot be (not x86-64 with AVX2, no compiler, an unwritable directory),
    said once on stderr with the reason. The library is loaded only once it is, to the byte, what the build process
    loaded (size and sha256 recorded beside it); any other file there (truncated, emptied, replaced, or built
    before the record existed) is named, moved aside and built again. The build runs in a child process: torch's
    extension builder imports setuptools, which puts its vendored packages on sys.path (a second `packaging` that the lock check would then
    see). Every later call answers from memory."""
    if _compiled_module:
        return _compiled_module[0]
    module, isa = None, torch.backends.cpu.get_cpu_capability()
    if platform.machine().lower() not in ("x86_64", "amd64") or isa not in _ISA_FLAGS:
        _compiled_module.append(None)
        return None
    name = f"draftsmith_few_rows_{isa.lower()}"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    folder = kernel_directory() / f"{name}-{digest}-torch{torch.__version__.replace('+', '_')}"
    library = folder / f"{name}.so"
    try:
        if folder.exists():
            try:
                _verify(library)
            except DamagedFilesError as error:  # never loaded: a truncated library takes the process down (SIGBUS)
                aside = move_aside(folder)
                print(f"[kernels] {error}; moved aside to {aside}, building it again", file=sys.stderr, flush=True)
        if not library.exists():
            _build(name, isa, folder)
            _verify(library)
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as error:  # no compiler, a read-only directory, a failed build: MKL's product still works
        print(f"[kernels] the compiled few-row product is unavailable ({error}); decoding uses MKL's transposed "
              f"product instead (set {ENV_SWITCH}=mkl to skip the attempt)", file=sys.stderr, flush=True)
        module = None
    _compiled_module.append(module)
    return module


def _build(name: str, isa: str, folder: Path) -> None:
    print(f"[kernels] building the few-row CPU product ({SOURCE.name}, {isa}) into {folder}: once, about a minute",
          file=sys.stderr, flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    script = ("import sys, torch\nfrom torch.utils.cpp_extension import load\n"
              "load(name=sys.argv[1], sources=[sys.argv[2]], build_directory=sys.argv[3], "
              "extra_cflags=['-O3', '-fopenmp', *sys.argv[4:]], extra_ldflags=['-fopenmp'])\n")
    environment = dict(os.environ)  # this environment's ninja, where the environment is not activated
    environment["PATH"] = os.pathsep.join(filter(None, [environment.get("PATH"), str(Path(sys.executable).parent)]))
    done = subprocess.run([sys.executable, "-c", script, name, str(SOURCE), str(folder), *_ISA_FLAGS[isa]],
                          capture_output=True, text=True, env=environment)
    if done.returncode:
        log = folder / "build.log"
        log.write_text(done.stdout + done.stderr)
        lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        causes = [line for line in lines if any(mark in line for mark in _BUILD_FAILURES)]
        raise RuntimeError(f"the build failed: {(causes or lines or ['no output'])[0][:300]}; whole output: {log}")
    library = folder / f"{name}.so"
    write_atomically(_record(library), json.dumps(digests(folder, [library.name])))  # what loaded in the child
    print(f"[kernels] built in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _record(library: Path) -> Path:
    return library.with_name(library.name + ".json")


def _verify(library: Path) -> None:
    """Raise `DamagedFilesError` unless `library` is, to the byte, what the build process loaded (the size and
    sha256 recorded beside it then)."""
    verify_files(library.parent, read_record(_record(library)), "this build")


@contextlib.contextmanager
def compiled_product(active: bool):
    """Within the block, `few_row_linear` uses the compiled product (True, where it is available) or MKL's
    transposed product only (False): a benchmark's middle side."""
    _compiled_off.append(not active)
    try:
        yield
    finally:
        _compiled_off.pop()


def _compiled_for(x: torch.Tensor, weight: torch.Tensor):
    if (_compiled_off[-1] if _compiled_off else os.environ.get(ENV_SWITCH, "1") == "mkl"):
        return None
    if x.dtype != torch.float32 or not weight.is_contiguous():
        return None
    module = compiled_module()
    return module if module is not None and weight.shape[1] % module.lanes() == 0 else None


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 1-16 rows on a CPU, by the compiled product where it applies, else as
    (W @ xᵀ)ᵀ with the rows padded with zero rows up to the next of `PADDED_ROWS` (a 2-row product costs less than
    MKL's 1-row one, an 8-row one less than 7 rows); F.linear elsewhere."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != weight.dtype or not transposed_product(rows, *weight.shape):
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    compiled = _compiled_for(x, weight)
    if compiled is not None:
        out = compiled.few_rows(flat, weight)
    else:
        padded = next(count for count in PADDED_ROWS if count >= rows)
        if padded > rows:
            flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.shape[1])])
        out = torch.mm(weight, flat.T)[:, :rows].T.contiguous()  # fused attention needs stride-1 rows
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


_chosen: list[bool] = []  # explicit choices of enclosing blocks, innermost last


def enabled() -> bool:
    """Whether a block without an explicit choice uses the few-row products: the innermost explicit choice, else the
    environment switch (on unless DRAFTSMITH_FEW_ROW_KERNEL=0)."""
    return _chosen[-1] if _chosen else os.environ.get(ENV_SWITCH, "1") != "0"


@contextlib.contextmanager
def few_row_linears(*models: torch.nn.Module, active: bool | None = None):
    """Within the block, every nn.Linear of `models`, and the `FEW_ROW_METHOD` (x -> x Wᵀ) of any module naming one,
    computes through `few_row_linear`, and transformers' SDPA attention attends over grouped key/value heads as they
    are (`enable_gqa`) instead of copying them for every query head (`GROUPED_ATTENTION`). `active` None follows
    `enabled()`; an explicit True/False also decides for the blocks nested inside (a benchmark's "before" run
    switches it off for the decoder's own blocks). Nested or repeated use is harmless."""
    if active is not None:
        _chosen.append(active)
    patched, grouped = [], os.environ.get(GROUPED_ATTENTION)
    if enabled():
        os.environ[GROUPED_ATTENTION] = "1"
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
        if grouped is None:
            os.environ.pop(GROUPED_ATTENTION, None)
        else:
            os.environ[GROUPED_ATTENTION] = grouped
        if active is not None:
            _chosen.pop()


def _bound(module: torch.nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        return few_row_linear(x, module.weight, getattr(module, "bias", None))
    return forward
