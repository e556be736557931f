"""pytest-benchmark suite over the cases of ``vqkernels.bench`` (same inputs, same floors).

Each ``bench_<family>.py`` sets ``OP`` (a key of ``vqkernels.bench.cases.OP_MODULES``)
and asks for ``bench_case``; it is parametrized over case x backend with ids like
``timestep-N4096xD256-cuda``, the reference first in each case so that the others
can report their speed-up against it; a backend the case could not run here is a
skipped test that says why. Options: ``--bench-device cpu|cuda``
(default cuda if available), ``--bench-quick`` (smallest shapes only).

    python -m pytest benchmarks                        # time everything
    python -m pytest benchmarks --benchmark-disable    # smoke: run each once
"""
from __future__ import annotations

import fnmatch

import pytest
import torch

from vqkernels.bench import cases as bench_cases
from vqkernels.bench import runner


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=("cpu", "cuda"),
                     default="cuda" if torch.cuda.is_available() else "cpu")
    parser.addoption("--bench-quick", action="store_true", help="smallest shapes only")


def pytest_collect_file(file_path, parent):
    """Collect ``bench_*.py`` here unless pytest already does (python_files, or named)."""
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    patterns = parent.config.getini("python_files")
    if parent.session.isinitpath(file_path) or any(fnmatch.fnmatch(file_path.name, p)
                                                   for p in patterns):
        return None
    return pytest.Module.from_parent(parent, path=file_path)


def _device(config) -> torch.device:
    device = torch.device(config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA GPU is available here")
    return device


def pytest_generate_tests(metafunc):
    if "bench_case" not in metafunc.fixturenames:
        return
    device = _device(metafunc.config)
    cases = bench_cases.load_cases([metafunc.module.OP], device,
                                   metafunc.config.getoption("--bench-quick"))
    marks = [pytest.mark.cuda] if device.type == "cuda" else []
    metafunc.parametrize("bench_case", [
        pytest.param((case, backend), id=f"{case.label}-{backend}",
                     marks=marks + _skip_marks(case, backend))
        for case in cases for backend in [*case.fns, *case.skipped]])


def _skip_marks(case: bench_cases.Case, backend: str) -> list:
    """A skip that says why, for a backend the case could not run here."""
    reason = case.skipped.get(backend)
    return [pytest.mark.skip(reason=reason)] if reason else []


@pytest.fixture(scope="session")
def bench_device(pytestconfig) -> torch.device:
    return _device(pytestconfig)


@pytest.fixture(scope="session")
def bench_ceilings(bench_device) -> dict:
    """Bandwidth and FLOP/s ceilings of the device (measured once on CPU)."""
    return runner.device_ceilings(bench_device)


@pytest.fixture(scope="session")
def _seconds() -> dict:
    return {}  # case label -> {backend: median seconds}


@pytest.fixture
def measure(benchmark, bench_device, bench_ceilings, _seconds):
    """Time one (case, backend) with pytest-benchmark; record floors and speed-ups (vs the
    reference, and vs the case's other baselines timed before it) in extra_info."""
    def run(case: bench_cases.Case, backend: str) -> None:
        fn = case.fns[backend]
        peak = runner.peak_memory_bytes(fn, bench_device)
        benchmark.group = case.label
        benchmark.extra_info.update(
            op=case.op, shape=case.shape, backend=backend, device=bench_device.type,
            bytes=case.bytes, flops=case.flops,
            peak_mib=peak / 2**20 if peak is not None else None)
        benchmark(_synchronizing(fn, bench_device))
        if benchmark.stats is None:  # --benchmark-disable: ran once, nothing timed
            return
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(runner.judge(case, seconds, bench_ceilings),
                                    **runner.rate(case, seconds))
        timed = _seconds.setdefault(case.label, {})
        timed[backend] = seconds
        if bench_cases.REFERENCE in timed:
            benchmark.extra_info["speedup"] = timed[bench_cases.REFERENCE] / seconds
        benchmark.extra_info["speedups"] = {name: timed[name] / seconds
                                            for name in case.baselines if name in timed}
    return run


def _synchronizing(fn, device: torch.device):
    """``fn`` that waits for its kernels, so a wall-clock timer sees their real time."""
    if device.type != "cuda":
        return fn

    def synchronized():
        fn()
        torch.cuda.synchronize(device)
    return synchronized
