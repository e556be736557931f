"""The bench's ceilings and how a row is judged against them (no timing here).

``judge`` must never report more than 100% of a ceiling: a time under its
floor means the ceiling was measured too low, and the row says so instead.
"""
from __future__ import annotations

import pytest
import torch

from vqkernels.bench import ceilings, report
from vqkernels.bench.cases import Case
from vqkernels.bench.runner import judge, memory_level

MIB = 2**20
CPU_CEILINGS = {
    "device": "test CPU", "source": "measured", "memory": "DRAM", "bandwidth": 20e9,
    "levels": [{"name": "L2", "bytes": 1 * MIB, "bandwidth": None},
               {"name": "L3", "bytes": 32 * MIB, "bandwidth": 80e9}],
    "flops": {"fp32": 100e9},
}


def _case(nbytes: int, flops: int = 0, working_set: int | None = None) -> Case:
    return Case(op="test", shape="s", fns={}, bytes=nbytes, flops=flops, working_set=working_set)


@pytest.mark.parametrize("device_name, key", [
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", None)])
def test_gpu_table_matches_the_most_specific_name(device_name, key):
    found = ceilings.table_entry(device_name)
    assert (found[0] if found else None) == key


def test_h100_pcie_numbers_are_the_datasheet():
    entry = ceilings.GPU_CEILINGS["H100 PCIe"]
    assert entry["bandwidth"] == 2.0e12 and entry["flops"]["bf16"] == 756e12
    assert "datasheet" in entry["note"]


@pytest.mark.parametrize("working_set, level, bandwidth", [
    (512 * 1024, "L2", None), (4 * MIB, "L3", 80e9), (64 * MIB, "DRAM", 20e9)])
def test_a_case_is_held_against_the_level_its_working_set_fits_in(working_set, level, bandwidth):
    assert memory_level(_case(working_set), CPU_CEILINGS) == (level, bandwidth)


def test_working_set_not_bytes_picks_the_level():
    # 50 steps over the same 4 MiB: 200 MiB of traffic, all of it from L3.
    verdict = judge(_case(200 * MIB, working_set=4 * MIB), 0.01, CPU_CEILINGS)
    assert verdict["memory_level"] == "L3"
    assert verdict["ceiling_pct"] == pytest.approx(100 * (200 * MIB / 80e9) / 0.01)


def test_in_cache_without_flops_gets_no_percentage():
    verdict = judge(_case(256 * 1024), 1e-6, CPU_CEILINGS)
    assert verdict["memory_level"] == "L2" and verdict["floor_us"] is None
    assert verdict["ceiling_pct"] is None and verdict["ceiling_problem"] is None


def test_in_cache_compute_bound_case_keeps_its_compute_floor():
    verdict = judge(_case(256 * 1024, flops=10**9), 0.02, CPU_CEILINGS)
    assert verdict["bound"] == "compute" and verdict["ceiling_pct"] == pytest.approx(50.0)


@pytest.mark.parametrize("nbytes, flops, what", [
    (64 * MIB, 0, "DRAM bandwidth"), (1 * MIB, 10**9, "fp32 FLOP/s")])
def test_faster_than_the_floor_is_a_ceiling_problem_not_over_100(nbytes, flops, what):
    floor = max(nbytes / 20e9 if nbytes > 32 * MIB else 0, flops / 100e9)
    verdict = judge(_case(nbytes, flops), floor / 2, CPU_CEILINGS)
    assert verdict["ceiling_pct"] is None and verdict["x_from_floor"] is None
    assert what in verdict["ceiling_problem"] and "measured too low" in verdict["ceiling_problem"]


def test_exactly_at_the_floor_is_100_percent():
    verdict = judge(_case(64 * MIB), 64 * MIB / 20e9, CPU_CEILINGS)
    assert verdict["ceiling_pct"] == pytest.approx(100.0) and verdict["ceiling_problem"] is None


def test_gpu_rows_are_judged_against_table_and_measured_ceilings():
    gpu = {"device": "NVIDIA H200", "source": "table (H200)", "memory": "HBM", "levels": [],
           "bandwidth": 4.3e12, "flops": {"bf16": 790e12},
           "measured": {"bandwidth": 4.0e12, "flops": {"bf16": 700e12}}}
    verdict = judge(_case(43 * 10**8), 0.002, gpu)  # 4.3 GB in 2 ms: half the table's 4.3 TB/s
    assert verdict["ceiling_pct"] == pytest.approx(50.0)
    assert verdict["measured_ceiling_pct"] == pytest.approx(100 * (43e8 / 4.0e12) / 0.002)
    faster = judge(_case(43 * 10**8), 0.00105, gpu)  # over the measured 4.0 TB/s, under 4.3
    assert faster["ceiling_pct"] is not None and faster["measured_ceiling_pct"] is None
    assert "measured HBM bandwidth" in faster["measured_ceiling_problem"]


def test_table_shows_the_problem_and_the_measured_column():
    gpu = {"device": "NVIDIA H200", "source": "table (H200)", "memory": "HBM", "levels": [],
           "bandwidth": 4.3e12, "flops": {"bf16": 790e12},
           "measured": {"bandwidth": 4.0e12, "flops": {"bf16": 700e12}}}
    row = {"op": "test", "shape": "s", "backend": "cuda", "time_us": 1050.0, "speedup": 2.0,
           "peak_mib": None, **judge(_case(43 * 10**8), 0.00105, gpu)}
    table = report.format_table([row], {"device": "NVIDIA H200", "ceilings": gpu})
    header, _, line = table.splitlines()[:3]
    assert "% meas" in header and "ceil!" in line and "HBM" in line
    assert "ceil! test s cuda: ran in 1050 us, under the measured HBM bandwidth floor" in table
    assert "measured at start (% meas): HBM copy 4000.0 GB/s; bf16 700 TFLOP/s" in table


@pytest.fixture
def fake_gpu(monkeypatch):
    """gpu_ceilings without a GPU: a fixed name and start-up measurements (test values)."""
    measured_flops = {"bf16": 7.6e14, "tf32": 3.9e14, "fp32": 5.0e13}
    monkeypatch.setattr(ceilings, "measure_gpu_copy_bandwidth", lambda device: 4.1e12)
    monkeypatch.setattr(ceilings, "measure_gpu_gemm_flops", lambda device: dict(measured_flops))

    def named(name):
        monkeypatch.setattr(ceilings, "device_name", lambda device: name)
        return ceilings.gpu_ceilings(torch.device("cuda"))
    return named


def test_known_gpu_keeps_the_table_and_measures_next_to_it(fake_gpu):
    found = fake_gpu("NVIDIA H200")
    assert found["bandwidth"] == 4.3e12 and found["flops"]["bf16"] == 790e12
    assert found["flops"]["tf32"] == 3.9e14, "a dtype the table lacks takes the measurement"
    assert "fp32, tf32: measured at start" in found["source"]
    assert found["measured"] == {"bandwidth": 4.1e12,
                                 "flops": {"bf16": 7.6e14, "tf32": 3.9e14, "fp32": 5.0e13}}


def test_unknown_gpu_is_judged_by_its_measurement(fake_gpu):
    found = fake_gpu("NVIDIA L4")
    assert found["source"].startswith("measured") and found["bandwidth"] == 4.1e12
    assert "measured" not in found
