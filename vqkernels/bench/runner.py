"""Times each backend of each case and judges it against the device's ceilings.

Measured per callable, after one warm-up call (JIT compilation, page faults):

- time: on CUDA the median of ``triton.testing.do_bench`` (CUDA events around
  each launch, L2 flushed between runs); on CPU the median of
  ``torch.utils.benchmark.Timer.blocked_autorange`` using all intra-op threads;
- peak memory: the most bytes live during one call beyond what was allocated
  before it (output included). CUDA: ``torch.cuda.max_memory_allocated``; CPU:
  the running sum of the profiler's allocation/free events; None if unknown;
- the floor: ``bytes / bandwidth`` or ``flops / peak FLOP/s``, whichever is
  longer, with GPU ceilings from ``GPU_CEILINGS`` and CPU ones measured here.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Callable

import torch

from vqkernels.bench.cases import REFERENCE, Case

# Measured ceilings, keyed by a substring of torch.cuda.get_device_name().
GPU_CEILINGS = {
    "H100": {"bandwidth": 3.0e12, "flops": {"bf16": 700e12, "tf32": 370e12, "fp32": 51e12}},
}
_COPY_BYTES = 256 * 2**20


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def device_ceilings(device: torch.device) -> dict:
    """Bandwidth (B/s) and peak FLOP/s per dtype: the table for known GPUs, else measured."""
    name = device_name(device)
    for key, ceilings in GPU_CEILINGS.items():
        if device.type == "cuda" and key in name:
            return {"device": name, "source": f"table ({key})", **ceilings}
    return {"device": name, "source": "measured", "bandwidth": measure_copy_bandwidth(device),
            "flops": {"fp32": measure_matmul_flops(device)}}


def measure_copy_bandwidth(device: torch.device) -> float:
    """B/s of a 256 MiB tensor copy (read + write counted), best of a few."""
    src = torch.full((_COPY_BYTES // 4,), 1.5, device=device)
    dst = torch.empty_like(src)
    seconds = time_seconds(lambda: dst.copy_(src), device, quick=True, repeat_best=True)
    return 2 * _COPY_BYTES / seconds


def measure_matmul_flops(device: torch.device, n: int = 1024) -> float:
    """FLOP/s of an n x n x n float32 matmul, best of a few."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    seconds = time_seconds(lambda: a @ b, device, quick=True, repeat_best=True)
    return 2 * n**3 / seconds


def time_seconds(fn: Callable, device: torch.device, quick: bool,
                 repeat_best: bool = False) -> float:
    """Median seconds per call of ``fn`` (best of a few when ``repeat_best``)."""
    fn()
    if device.type == "cuda":
        return _cuda_seconds(fn, device, quick, "min" if repeat_best else "median")
    if repeat_best:
        return min(_wall(fn) for _ in range(3))  # the CPU runs synchronously
    from torch.utils.benchmark import Timer

    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=0.05 if quick else 0.5).median


def _wall(fn: Callable) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _cuda_seconds(fn: Callable, device: torch.device, quick: bool, mode: str) -> float:
    warmup_ms, rep_ms = (5, 25) if quick else (25, 100)
    with torch.cuda.device(device):
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_seconds(fn, reps=20 if quick else 100)
        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode=mode) / 1e3


def _cuda_event_seconds(fn: Callable, reps: int) -> float:
    """Median over ``reps`` launches, each bracketed by CUDA events (no L2 flush)."""
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def peak_memory_bytes(fn: Callable, device: torch.device) -> int | None:
    """Most bytes live during one call of ``fn`` beyond those allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak
    return _cpu_peak_memory_bytes(fn)


def _cpu_peak_memory_bytes(fn: Callable) -> int | None:
    from torch.profiler import ProfilerActivity, profile

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # kineto prints status lines to stderr
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = fn()
            del out
        # The raw events: prof.events() folds allocations into the op that made them.
        events = [e for e in prof.profiler.kineto_results.events()
                  if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    except (AttributeError, RuntimeError):
        return None
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak if events else None


def judge(case: Case, seconds: float, ceilings: dict) -> dict:
    """Achieved throughput and distance from the floor time of ``case`` at ``seconds``."""
    memory_floor = case.bytes / ceilings["bandwidth"] if ceilings.get("bandwidth") else None
    peak_flops = ceilings.get("flops", {}).get(case.flop_dtype)
    compute_floor = case.flops / peak_flops if peak_flops and case.flops else None
    compute_bound = compute_floor is not None and (memory_floor is None
                                                   or compute_floor > memory_floor)
    floor = compute_floor if compute_bound else memory_floor
    achieved = case.flops / seconds / 1e12 if compute_bound else case.bytes / seconds / 1e9
    return {
        "bound": "compute" if compute_bound else "memory",
        "achieved": achieved,
        "achieved_unit": "TFLOP/s" if compute_bound else "GB/s",
        "floor_us": floor * 1e6 if floor is not None else None,
        "ceiling_pct": 100 * floor / seconds if floor is not None else None,
        "x_from_floor": seconds / floor if floor else None,
    }


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool) -> list[dict]:
    """One row per backend of ``case``: time, speed-up vs the reference, floor, peak memory."""
    rows = []
    for backend, fn in case.fns.items():
        fn()  # compile / fault pages in before measuring memory
        peak = peak_memory_bytes(fn, device)
        seconds = time_seconds(fn, device, quick)
        rows.append({"op": case.op, "shape": case.shape, "backend": backend,
                     "device": device.type, "time_us": seconds * 1e6, "bytes": case.bytes,
                     "flops": case.flops, "peak_mib": peak / 2**20 if peak is not None else None,
                     **judge(case, seconds, ceilings)})
    ref = next((row["time_us"] for row in rows if row["backend"] == REFERENCE), None)
    for row in rows:
        row["speedup"] = ref / row["time_us"] if ref is not None else None
    return rows


def run(cases: list[Case], device: torch.device, ceilings: dict, quick: bool,
        progress: bool | None = None) -> list[dict]:
    """Rows of every case; a tqdm bar over cases (``None``: only on a terminal)."""
    from tqdm import tqdm

    rows = []
    for case in tqdm(cases, desc="bench", unit="case", disable=None if progress is None
                     else not progress):
        rows += run_case(case, device, ceilings, quick)
    return rows
