"""Benchmark cases: what is timed, on which inputs, and the floor it is judged by.

A ``Case`` is one op at one shape. Its backends are zero-arg callables that all
run on the same freshly drawn random inputs; the ``"reference"`` one (the
pure-PyTorch spec) is the baseline of every speed-up. ``bytes`` (each input
read once, each output written once) and ``flops`` are the least work the op
can do: the runner turns them into achieved GB/s or TFLOP/s and a floor time.
``working_set`` (default ``bytes``) is the data one call keeps live; it picks
the memory level (cache or DRAM) whose bandwidth sets the floor. A backend that
cannot run here is not timed but listed in ``skipped`` with the reason, which
the report prints. Each op family has a module with ``cases(device, quick) ->
list[Case]``, listed in ``OP_MODULES``. A case whose call makes ``items`` things
(images) also gets a rate per second.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch

REFERENCE = "reference"
COMPILED = "compiled"  # torch.compile of a family's eager baseline

# op family -> module providing cases(device: torch.device, quick: bool) -> list[Case]
OP_MODULES = {
    "adaln": "vqkernels.bench.adaln",
    "attention": "vqkernels.bench.attention",
    "ddim": "vqkernels.bench.ddim",
    "ema": "vqkernels.bench.ema",
    "models": "vqkernels.bench.models",
    "quantizer": "vqkernels.bench.quantizer",
    "rvq": "vqkernels.bench.rvq",
    "search": "vqkernels.bench.search",
    "timestep": "vqkernels.bench.timestep",
}


@dataclass
class Case:
    """One op at one shape: a callable per backend, all on the same inputs."""

    op: str
    shape: str
    fns: dict[str, Callable[[], object]]  # backend name -> zero-arg callable; holds REFERENCE
    bytes: int  # minimum bytes moved: inputs read once + outputs written once
    flops: int = 0  # floating-point operations (0: not a compute-bound op)
    flop_dtype: str = "fp32"  # which FLOP/s ceiling applies: "fp32", "tf32" or "bf16"
    working_set: int | None = None  # bytes live during one call; None: ``bytes``
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it cannot run here
    baselines: tuple[str, ...] = ()  # backends besides the reference every row is compared to
    items: int = 0  # things one call makes (e.g. 64 images), for a rate per second; 0: none
    items_unit: str = "images"

    @property
    def resident_bytes(self) -> int:
        """Bytes one call keeps live: ``working_set``, else ``bytes``.

        A case that rereads its data (e.g. a loop over the same tensors) sets a
        ``working_set`` smaller than ``bytes``, so its floor uses the bandwidth
        of the memory level that data fits in.
        """
        return self.bytes if self.working_set is None else self.working_set

    @property
    def label(self) -> str:
        return f"{self.op}-{self.shape}"


def usable_backends(dispatch, device: torch.device, dtype: torch.dtype, **shape) -> list[str]:
    """Backends of ``dispatch`` that can run this input here, the reference first.

    Triton on a CPU (the interpreter) is a test tool, not a contender: left out.
    """
    usable = [name for name, reasons in dispatch.explain(device, dtype, **shape).items()
              if not reasons and not (name == "triton" and device.type == "cpu")]
    return sorted(usable, key=lambda name: name != REFERENCE)


def why_not_runnable(fn: Callable[[], object],
                     errors: tuple[type[BaseException], ...]) -> str | None:
    """None if ``fn()`` runs; else the first sentence of the error of ``errors`` it raised.

    A backend whose kernel is not registered for this device (NotImplementedError), or a
    baseline that cannot be built here (e.g. torch.compile without a compiler), is then
    skipped with this reason; any other error still propagates.
    """
    try:
        fn()
    except errors as error:
        first = " ".join(str(error).split()).split(". ")[0]
        return f"{type(error).__name__}: {first[:200]}"
    return None


def compiled_contender(run: Callable[[Callable], Callable[[], object]], eager: Callable,
                       compiled: bool) -> tuple[dict, dict]:
    """The "compiled" contender of ``sort_out``: ``run`` of ``torch.compile(eager)``, where any
    error means it cannot compile here; or, when not ``compiled`` (--quick), why it is left out.

    Returns ``(contenders, skipped)``.
    """
    if not compiled:
        return {}, {COMPILED: "--quick leaves torch.compile out (compiling outlasts a quick run)"}
    return {COMPILED: (run(torch.compile(eager, dynamic=False)), (Exception,))}, {}


def sort_out(fns: dict, contenders: dict, skipped: dict) -> tuple[dict, dict]:
    """``fns`` (the reference first) plus each contender that runs here, and why each other
    one cannot (added to ``skipped``).

    ``contenders``: name -> (zero-arg callable, the errors that mean it cannot run here).
    """
    fns = dict(fns)
    for name, (fn, errors) in contenders.items():
        reason = why_not_runnable(fn, errors)
        if reason is None:
            fns[name] = fn
        else:
            skipped[name] = reason
    return fns, skipped


def eager_compiled_and_kernels(run: Callable[[Callable], Callable[[], object]],
                               eager: Callable, ours: Callable[[str], Callable], dispatch,
                               device: torch.device, dtype: torch.dtype,
                               compiled: bool) -> tuple[dict, dict]:
    """``sort_out`` of an op's rows: ``run(eager)`` as the reference, its torch.compile (when
    ``compiled``) and ``run(ours(name))`` for each usable kernel backend of ``dispatch``."""
    contenders, skipped = compiled_contender(run, eager, compiled)
    for name in usable_backends(dispatch, device, dtype):
        if name != REFERENCE:  # the eager code is the reference row
            contenders[name] = (run(ours(name)), (NotImplementedError,))
    return sort_out({REFERENCE: run(eager)}, contenders, skipped)


def forward_only(fn: Callable, args: tuple) -> object:
    """``fn(*args)`` without autograd: a forward pass as inference runs it."""
    with torch.no_grad():
        return fn(*args)


def load_cases(ops: list[str], device: torch.device, quick: bool) -> list[Case]:
    """The cases of each named op family, in order."""
    unknown = [op for op in ops if op not in OP_MODULES]
    if unknown:
        raise ValueError(f"unknown op families {unknown}; valid: {sorted(OP_MODULES)}")
    cases = []
    for op in ops:
        cases += importlib.import_module(OP_MODULES[op]).cases(device, quick)
    return cases
