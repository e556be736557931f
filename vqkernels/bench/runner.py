"""Times each backend of each case and judges it against the device's ceilings.

For every callable, after one warm-up call (JIT compilation, page faults), a
row records the median time (``time_seconds``), the most memory one call adds
(``peak_memory_bytes``), the speed-up over the reference, and the floor time
that the case's bytes and FLOPs allow at the ceilings of
``vqkernels.bench.ceilings`` (``judge``). A time under its floor means a
ceiling was measured too low, so it is reported as such rather than as a
percentage over 100.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable

import torch

from vqkernels.bench.cases import REFERENCE, Case
from vqkernels.bench.ceilings import (GPU_CEILINGS, device_ceilings,  # noqa: F401 (re-exported)
                                      device_name)


def time_seconds(fn: Callable, device: torch.device, quick: bool,
                 repeat_best: bool = False) -> float:
    """Median seconds per call of ``fn`` (best of a few when ``repeat_best``), after a warm-up.

    On CUDA ``triton.testing.do_bench`` (CUDA events around each launch, L2
    flushed between runs; plain CUDA events without Triton); on CPU
    ``torch.utils.benchmark.Timer.blocked_autorange`` using all intra-op threads.
    """
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
    """Most bytes live during one call of ``fn`` beyond those allocated before it.

    The output counts too. CUDA: ``torch.cuda.max_memory_allocated``; CPU: the
    running sum of the profiler's allocation and free events; None if unknown.
    """
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


def memory_level(case: Case, ceilings: dict) -> tuple[str, float | None]:
    """The memory level ``case``'s working set fits in, and its bandwidth (None: in cache)."""
    for level in ceilings.get("levels", ()):
        if case.resident_bytes <= level["bytes"]:
            return level["name"], level["bandwidth"]
    return ceilings.get("memory", "memory"), ceilings.get("bandwidth")


def judge(case: Case, seconds: float, ceilings: dict) -> dict:
    """Achieved throughput and distance from the floor time of ``case`` at ``seconds``.

    The floor is the longer of ``bytes / bandwidth`` (of the level the working
    set fits in) and ``flops / peak``; ``ceiling_pct`` is ``100 * floor / time``.
    A time under the floor would be over 100%: the ceiling was measured too low,
    so ``ceiling_pct`` is None and ``ceiling_problem`` says why. On a GPU in
    ``GPU_CEILINGS`` the same is done against the ceilings measured at start
    (``measured_*``).
    """
    level, bandwidth = memory_level(case, ceilings)
    floor, bound, what = _floor(case, bandwidth, ceilings.get("flops", {}), level)
    pct, problem = _percent(floor, seconds, what)
    compute_bound = bound == "compute"
    verdict = {
        "bound": bound,
        "memory_level": level,
        "achieved": case.flops / seconds / 1e12 if compute_bound else case.bytes / seconds / 1e9,
        "achieved_unit": "TFLOP/s" if compute_bound else "GB/s",
        "floor_us": floor * 1e6 if floor is not None else None,
        "ceiling_pct": pct,
        "x_from_floor": seconds / floor if pct is not None else None,
        "ceiling_problem": problem,
        "measured_ceiling_pct": None,
        "measured_ceiling_problem": None,
    }
    measured = ceilings.get("measured")
    if measured:
        floor, _, what = _floor(case, measured.get("bandwidth"), measured.get("flops", {}), level)
        verdict["measured_ceiling_pct"], verdict["measured_ceiling_problem"] = _percent(
            floor, seconds, f"measured {what}")
    return verdict


def _floor(case: Case, bandwidth: float | None, flops: dict,
           level: str) -> tuple[float | None, str, str]:
    """Floor seconds (None: no ceiling applies), "compute" or "memory", and the ceiling's name."""
    memory = case.bytes / bandwidth if bandwidth else None
    peak = flops.get(case.flop_dtype)
    compute = case.flops / peak if peak and case.flops else None
    if compute is not None and (memory is None or compute > memory):
        return compute, "compute", f"{case.flop_dtype} FLOP/s"
    return memory, "memory", f"{level} bandwidth"


def _percent(floor: float | None, seconds: float, what: str) -> tuple[float | None, str | None]:
    """``100 * floor / seconds``, or None and the reason when that would exceed 100."""
    if floor is None:
        return None, None
    if floor > seconds:
        return None, (f"ran in {seconds * 1e6:.4g} us, under the {what} floor of "
                      f"{floor * 1e6:.4g} us: that ceiling was measured too low")
    return 100 * floor / seconds, None


def rate(case: Case, seconds: float) -> dict:
    """``items_per_s`` and ``items_unit`` of a call taking ``seconds`` (None without items)."""
    if not case.items:
        return {"items_per_s": None, "items_unit": None}
    return {"items_per_s": case.items / seconds, "items_unit": case.items_unit}


def run_case(case: Case, device: torch.device, ceilings: dict, quick: bool,
             failures: list[dict] | None = None) -> list[dict]:
    """One row per backend of ``case``: time, speed-up vs the reference (and vs each of
    ``case.baselines`` that ran, in ``speedups``), floor, peak memory, and the rate of
    ``case.items`` per second (``items_per_s``; None for a case without items).

    A backend that raises: with a ``failures`` list, recorded there ({op, shape,
    backend, error}) and left out, so the other backends keep their rows; else raised.
    """
    rows = []
    for backend, fn in case.fns.items():
        try:
            fn()  # compile / fault pages in before measuring memory
            peak = peak_memory_bytes(fn, device)
            seconds = time_seconds(fn, device, quick)
        except Exception as error:
            if failures is None:
                raise
            failures.append({"op": case.op, "shape": case.shape, "backend": backend,
                             "error": f"{type(error).__name__}: {error}"})
            print(f"bench: {case.op} {case.shape} {backend} failed: {failures[-1]['error']}",
                  file=sys.stderr)
            continue
        rows.append({"op": case.op, "shape": case.shape, "backend": backend,
                     "device": device.type, "time_us": seconds * 1e6, "bytes": case.bytes,
                     "working_set": case.resident_bytes, "flops": case.flops,
                     "flop_dtype": case.flop_dtype,
                     "peak_mib": peak / 2**20 if peak is not None else None,
                     **rate(case, seconds), **judge(case, seconds, ceilings)})
    times = {row["backend"]: row["time_us"] for row in rows}
    for row in rows:
        row["speedup"] = times[REFERENCE] / row["time_us"] if REFERENCE in times else None
        row["speedups"] = {name: times[name] / row["time_us"] for name in case.baselines
                           if name in times}
    return rows


def run(cases: list[Case], device: torch.device, ceilings: dict, quick: bool,
        progress: bool | None = None, failures: list[dict] | None = None) -> list[dict]:
    """Rows of every case; a tqdm bar over cases (``None``: only on a terminal).

    Interrupted (Ctrl-C, or SIGINT from a timeout), it returns the rows so far, so
    that a bench cut short still writes what it measured. ``failures``: as run_case.
    """
    from tqdm import tqdm

    rows = []
    try:
        for case in tqdm(cases, desc="bench", unit="case", disable=None if progress is None
                         else not progress):
            rows += run_case(case, device, ceilings, quick, failures)
    except KeyboardInterrupt:
        done = len({(row["op"], row["shape"]) for row in rows})
        print(f"bench: interrupted after {done} of {len(cases)} cases; "
              "reporting those", file=sys.stderr)
    return rows
