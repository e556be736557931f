"""Backend selection shared by every op.

Each op declares its backends as ``Backend`` records (what each accepts) and,
per device type, the order ``backend="auto"`` tries them in; the op's file
says why that order. A backend named explicitly (the argument, else
``$VQKERNELS_BACKEND``) that cannot take the input raises
``BackendUnavailableError`` listing every reason: only ``auto`` moves on, and
it ends at the reference. On CUDA ``auto`` is cautious: backends verified on a
GPU of the device's compute capability (``vqkernels._verified``) come first,
in the op's order; of the rest, Triton (parity-tested under the interpreter,
compile-tested for sm_90) goes before hand-written CUDA kernels.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from vqkernels import _ext, _verified

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "VQKERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was named explicitly but cannot run this input."""


def triton_reasons(device: torch.device) -> list[str]:
    """Why Triton cannot run on ``device``: it needs a GPU, or the interpreter on CPU."""
    try:
        import triton  # noqa: F401  (imported here: TRITON_INTERPRET must be set first)
    except ImportError as error:
        return [f"triton is not importable ({error})"]
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    return [f"Triton runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {device.type}"]


def _library_reasons(name: str, device: torch.device) -> list[str]:
    if name == "reference":
        return []
    if name == "triton":
        return triton_reasons(device)
    reasons = list(_ext.cpu_kernels_reasons() if name == "cpu" else _ext.cuda_kernels_reasons())
    if device.type != name:
        reasons.append(f"the {name} backend needs a {name.upper()} tensor, got {device.type}")
    return reasons


@dataclass(frozen=True)
class Backend:
    """One implementation of an op and what it accepts."""

    name: str
    run: Callable
    dtypes: tuple[torch.dtype, ...] | None = None  # None: every dtype the op accepts
    limits: Callable[..., list[str]] | None = None  # op-specific shape limits -> reasons

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, **shape) -> list[str]:
        reasons = _library_reasons(self.name, device)
        if self.dtypes is not None and dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} is not one of {list(self.dtypes)}")
        if self.limits is not None:
            reasons += self.limits(device=device, dtype=dtype, **shape)
        return reasons


@dataclass
class OpDispatch:
    """The backends of one op and the order ``auto`` tries them in, per device type.

    ``auto_skip`` maps a backend to a further condition that only ``auto``
    applies (the backend can run the input, but another is faster there).
    """

    op: str
    backends: dict[str, Backend]
    auto_order: dict[str, tuple[str, ...]] = field(default_factory=dict)
    auto_skip: dict[str, Callable[..., list[str]]] = field(default_factory=dict)

    def select(self, requested: str | None, device: torch.device, dtype: torch.dtype,
               **shape) -> Backend:
        name = requested_backend(requested)
        if name == "auto":
            return self._auto(device, dtype, **shape)
        backend = self.backends.get(name)
        if backend is None:
            raise BackendUnavailableError(f"{self.op} has no {name!r} backend "
                                          f"(it has {sorted(self.backends)})")
        reasons = backend.not_supported_reasons(device, dtype, **shape)
        if reasons:
            raise BackendUnavailableError(
                f"backend {name!r} cannot run {self.op} on this input: " + "; ".join(reasons))
        return backend

    def auto_candidates(self, device: torch.device) -> tuple[str, ...]:
        """The order ``auto`` tries the backends in on ``device`` (the module docstring)."""
        order = self.auto_order.get(device.type, ())
        if device.type == "cuda":
            capability = device_capability(device)
            verified = [name for name in order if _verified.is_verified(self.op, name, capability)]
            unverified = sorted((name for name in order if name not in verified),
                                key=lambda name: name != "triton")  # stable: Triton first
            order = tuple(verified + unverified)
        return order + ("reference",)

    def _auto(self, device: torch.device, dtype: torch.dtype, **shape) -> Backend:
        for name in self.auto_candidates(device):
            skip = self.auto_skip.get(name)
            if skip is not None and skip(device=device, dtype=dtype, **shape):
                continue
            if not self.backends[name].not_supported_reasons(device, dtype, **shape):
                return self.backends[name]
        raise BackendUnavailableError(f"no backend of {self.op} can run this input: "
                                      f"{self.explain(device, dtype, **shape)}")

    def explain(self, device: torch.device, dtype: torch.dtype, **shape) -> dict[str, list[str]]:
        """Every backend's reasons for refusing this input ([] = usable); for info()."""
        return {name: b.not_supported_reasons(device, dtype, **shape)
                for name, b in self.backends.items()}


@torch.compiler.assume_constant_result  # traced as a constant: no graph break under compile
def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device (the current one for index None)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return tuple(torch.cuda.get_device_capability(index))


def requested_backend(requested: str | None) -> str:
    """The backend a call asks for: its argument, else $VQKERNELS_BACKEND, else auto."""
    name = requested if requested is not None else os.environ.get(ENV_VAR, "auto")
    if name != "auto" and name not in BACKENDS:
        source = "backend" if requested is not None else ENV_VAR
        raise ValueError(f"{source} must be 'auto' or one of {BACKENDS}, got {name!r}")
    return name
