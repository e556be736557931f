"""The ceilings a benchmark row is judged against: memory bandwidth and peak FLOP/s.

GPUs: ``GPU_CEILINGS`` holds known devices' numbers (``table_entry`` matches
the device name). On every GPU the copy bandwidth of a buffer far beyond L2 and
the FLOP/s of large bf16, tf32 and fp32 GEMMs are also measured at start: they
fill the dtypes the table lacks and alone judge a GPU it does not know. The GPU
timer flushes L2, so every GPU case is held against device memory. CPUs: all is
measured at the kernels' thread count (see ``cpu_ceilings``). The CPU timer
keeps a case's data hot, so a case is held against the level its working set
fits in: ``levels`` (smallest first), then ``bandwidth`` (DRAM).
"""
from __future__ import annotations

import glob
import os
import platform
import time
from typing import Callable

import torch

from vqkernels import _ext

# Keyed by a substring of torch.cuda.get_device_name(); the most specific (longest) match wins.
# An H100 NVL would match "H100" (the SXM numbers): it is not in this table yet.
GPU_CEILINGS = {
    "H100 PCIe": {"bandwidth": 2.0e12, "flops": {"bf16": 756e12, "tf32": 378e12, "fp32": 51e12},
                  "note": "datasheet: 2.0 TB/s, dense bf16 756, tf32 378, fp32 51 TFLOP/s"},
    "H100": {"bandwidth": 3.0e12, "flops": {"bf16": 700e12, "tf32": 370e12, "fp32": 51e12},
             "note": "H100 SXM: copy 3.0 TB/s and fp32 51 TFLOP/s measured; dense bf16 700, "
                     "tf32 370 TFLOP/s"},
    "H200": {"bandwidth": 4.3e12, "flops": {"bf16": 790e12},
             "note": "measured: copy ~4.3 TB/s, bf16 GEMM ~790 TFLOP/s"},
}
GPU_MEMORY = "HBM"
CPU_MEMORY = "DRAM"
_GPU_COPY_BYTES = 1 << 30  # 1 GiB each way: far beyond any GPU's L2
_GPU_GEMM_N = 8192
_CPU_GEMM_N = 2048  # ~17 GFLOP: past the BLAS's ramp-up (1024^3 is not), yet quick
_CPU_DRAM_COPY_BYTES = 256 << 20
_CPU_MIN_SAMPLES, _CPU_MAX_SAMPLES, _CPU_SAMPLING_S = 3, 20, 1.0


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model and the thread count the kernels use."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def table_entry(name: str) -> tuple[str, dict] | None:
    """The ``GPU_CEILINGS`` key and entry for a device name, the longest matching key first."""
    keys = sorted((key for key in GPU_CEILINGS if key in name), key=len, reverse=True)
    return (keys[0], GPU_CEILINGS[keys[0]]) if keys else None


def device_ceilings(device: torch.device) -> dict:
    """Bandwidth (B/s), FLOP/s per dtype, memory levels and their source for ``device``."""
    if device.type == "cuda":
        return gpu_ceilings(device)
    return cpu_ceilings(device)


def gpu_ceilings(device: torch.device) -> dict:
    """The table's numbers for a known GPU, with the start-up measurement next to them."""
    name = device_name(device)
    measured = {"bandwidth": measure_gpu_copy_bandwidth(device),
                "flops": measure_gpu_gemm_flops(device)}
    found = table_entry(name)
    if found is None:
        return {"device": name, "source": "measured (not in GPU_CEILINGS)",
                "memory": "device memory", "levels": [], **measured}
    key, entry = found
    source = f"table ({key}): {entry['note']}"
    from_measured = sorted(set(measured["flops"]) - set(entry["flops"]))
    if from_measured:  # a dtype the table lacks is judged by its start-up measurement
        source += f"; {', '.join(from_measured)}: measured at start"
    return {"device": name, "source": source, "memory": GPU_MEMORY, "levels": [],
            "bandwidth": entry["bandwidth"], "flops": {**measured["flops"], **entry["flops"]},
            "measured": measured}


def cpu_ceilings(device: torch.device) -> dict:
    """Measured GEMM FLOP/s (fp32; bf16 where the C++ search screens with it), DRAM copy
    bandwidth and the cache levels above it.

    All at the thread count the kernels use: the GEMM is large enough to reach
    the BLAS's steady state; copy bandwidth is measured for a buffer that fits
    in L3 and for one far beyond it (DRAM). L2 gets no bandwidth (None): a
    working set that fits there is "in cache" and has no bandwidth floor, since
    a copy that small is dominated by per-call costs and would give a ceiling
    too low to judge by.
    """
    dram = measure_cpu_copy_bandwidth(max(_CPU_DRAM_COPY_BYTES, 4 * _cache_bytes(3)))
    levels = []
    if _cache_bytes(2):
        levels.append({"name": "L2", "bytes": _cache_bytes(2), "bandwidth": None})
    if _cache_bytes(3):
        # Half of L3 for source + destination, so both stay resident.
        l3 = measure_cpu_copy_bandwidth(_cache_bytes(3) // 4)
        levels.append({"name": "L3", "bytes": _cache_bytes(3), "bandwidth": max(l3, dram)})
    return {"device": device_name(device), "source": "measured", "memory": CPU_MEMORY,
            "levels": levels, "bandwidth": dram,
            "flops": {name: measure_cpu_gemm_flops(_CPU_GEMM_N, dtype)
                      for name, dtype in _cpu_flop_dtypes().items()}}


def _cpu_flop_dtypes() -> dict[str, torch.dtype]:
    """fp32, and bf16 where a CPU case is held to it: the search's bf16 screen."""
    screen = _ext.build_info().get("cpu_search_screen")
    return {"fp32": torch.float32, **({"bf16": torch.bfloat16} if screen else {})}


def _cache_bytes(level: int) -> int:
    """Bytes of the level-``level`` data caches reachable by the threads the kernels use.

    Sums the distinct cache instances (by the CPUs sharing them) of the first
    ``torch.get_num_threads()`` CPUs this process may run on; 0 if unknown.
    """
    cpus = sorted(os.sched_getaffinity(0))[:torch.get_num_threads()]
    instances = {}
    for cpu in cpus:
        for index in glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/cache/index*"):
            try:
                fields = {name: open(f"{index}/{name}").read().strip()
                          for name in ("level", "type", "size", "shared_cpu_list")}
            except OSError:
                continue
            if int(fields["level"]) == level and fields["type"] in ("Data", "Unified"):
                instances[fields["shared_cpu_list"]] = _parse_size(fields["size"])
    return sum(instances.values())


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def measure_cpu_copy_bandwidth(buffer_bytes: int) -> float:
    """B/s (read + write counted) of copying a ``buffer_bytes`` fp32 tensor, best of a few.

    Copies are repeated until each sample moves at least ~64 MiB, so per-call
    costs do not dominate a cache-sized buffer.
    """
    src = torch.full((max(buffer_bytes // 4, 1),), 1.5)
    dst = torch.empty_like(src)
    repeats = max(1, (64 << 20) // buffer_bytes)

    def copies():
        for _ in range(repeats):
            dst.copy_(src)

    return 2 * src.numel() * 4 * repeats / _best_wall_seconds(copies)


def measure_cpu_gemm_flops(n: int, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n x n matmul at ``torch.get_num_threads()`` threads, best of a few."""
    a, b = torch.rand(n, n, dtype=dtype), torch.rand(n, n, dtype=dtype)
    out = torch.empty(n, n, dtype=dtype)
    return 2 * n**3 / _best_wall_seconds(lambda: torch.mm(a, b, out=out))


def _best_wall_seconds(fn: Callable) -> float:
    """Fastest of at least ``_CPU_MIN_SAMPLES`` calls, more while under ``_CPU_SAMPLING_S``.

    The best, not the median: a ceiling is what the machine can do, and on a
    shared machine more samples give a better chance of a quiet moment.
    """
    fn()  # warm-up: page faults, thread pool start
    best, started, samples = float("inf"), time.perf_counter(), 0
    while samples < _CPU_MIN_SAMPLES or (samples < _CPU_MAX_SAMPLES
                                         and time.perf_counter() - started < _CPU_SAMPLING_S):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
        samples += 1
    return best


def measure_gpu_copy_bandwidth(device: torch.device) -> float:
    """B/s (read + write counted) of a 1 GiB device-to-device copy, best of a few."""
    from vqkernels.bench.runner import time_seconds  # here: runner imports this module

    src = torch.full((_GPU_COPY_BYTES // 4,), 1.5, device=device)
    dst = torch.empty_like(src)
    seconds = time_seconds(lambda: dst.copy_(src), device, quick=True, repeat_best=True)
    return 2 * _GPU_COPY_BYTES / seconds


def measure_gpu_gemm_flops(device: torch.device) -> dict:
    """FLOP/s of an 8192^3 GEMM in bf16, tf32 and fp32 (TF32 off), best of a few."""
    from vqkernels.bench.runner import time_seconds  # here: runner imports this module

    n = _GPU_GEMM_N
    flops = {}
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                                  ("fp32", torch.float32, False)):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
            flops[name] = 2 * n**3 / time_seconds(lambda: a @ b, device, quick=True,
                                                  repeat_best=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    return flops
