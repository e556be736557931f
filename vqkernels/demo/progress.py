"""Progress bars on stderr (tqdm, already a vqkernels dependency) and stage timers."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm


class _Bar:
    """A tqdm bar on stderr showing the last loss; does nothing when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self._bar = tqdm(total=total, desc=desc, file=sys.stderr, disable=not enabled,
                         leave=False, dynamic_ncols=True)
        self._every = max(total // 50, 1)  # reading the loss syncs a GPU: not every step

    def update(self, n: int = 1, loss: torch.Tensor | None = None) -> None:
        self._bar.update(n)
        if loss is not None and not self._bar.disable and self._bar.n % self._every == 0:
            self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)

    def close(self) -> None:
        self._bar.close()


def progress_bar(total: int, desc: str, *, enabled: bool = True) -> _Bar:
    return _Bar(total, desc, enabled)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def timed(timings: dict, key: str, device: torch.device):
    """Adds the wall time of the block (the device synchronized at both ends) to timings[key]."""
    synchronize(device)
    start = time.perf_counter()
    try:
        yield
    finally:
        synchronize(device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start


def time_steps(step, steps: int, device: torch.device) -> float:
    """Mean seconds of ``step()`` over ``steps`` calls, after one untimed warm-up call."""
    step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / max(steps, 1)
