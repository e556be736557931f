"""Benchmark cases: what is timed, on which inputs, and the floor it is judged by.

A ``Case`` is one op at one shape. Its backends are zero-arg callables that all
run on the same freshly drawn random inputs; the ``"reference"`` one (the
pure-PyTorch spec) is the baseline of every speed-up. ``bytes`` (each input
read once, each output written once) and ``flops`` are the least work the op
can do: the runner turns them into achieved GB/s or TFLOP/s and a floor time.
``working_set`` (default ``bytes``) is the data one call keeps live; it picks
the memory level (cache or DRAM) whose bandwidth sets the floor. Each op family
has a module with ``cases(device, quick) -> list[Case]``, listed in ``OP_MODULES``.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

import torch

REFERENCE = "reference"

# op family -> module providing cases(device: torch.device, quick: bool) -> list[Case]
OP_MODULES = {
    "attention": "vqkernels.bench.attention",
    "ddim": "vqkernels.bench.ddim",
    "ema": "vqkernels.bench.ema",
    "quantizer": "vqkernels.bench.quantizer",
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


def load_cases(ops: list[str], device: torch.device, quick: bool) -> list[Case]:
    """The cases of each named op family, in order."""
    unknown = [op for op in ops if op not in OP_MODULES]
    if unknown:
        raise ValueError(f"unknown op families {unknown}; valid: {sorted(OP_MODULES)}")
    cases = []
    for op in ops:
        cases += importlib.import_module(OP_MODULES[op]).cases(device, quick)
    return cases
