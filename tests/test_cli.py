"""``python -m vqkernels info | selftest | bench`` run as a user would, in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import run_python


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"device", "versions", "extension", "date", "host", "ceilings", "rows", "skipped"}
ROW_KEYS = {"op", "shape", "backend", "time_us", "speedup", "bytes", "flops", "achieved",
            "achieved_unit", "floor_us", "ceiling_pct", "x_from_floor", "peak_mib",
            "working_set", "flop_dtype", "memory_level", "ceiling_problem",
            "measured_ceiling_pct", "measured_ceiling_problem", "speedups"}


def _cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI on the same vqkernels this test imported."""
    return run_python("-m", "vqkernels", *args, cwd=cwd, timeout=timeout)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"exit code {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = _ok(_cli("bench", "--quick", "--device", "cpu", "--json", str(out / "bench.json"),
                      "--plot", str(out / "bench.png"), cwd=out, timeout=400))
    return result, out


def test_info_prints_dispatch(tmp_path):
    out = _ok(_cli("info", cwd=tmp_path)).stdout
    assert "vqkernels" in out and "timestep_embedding on cpu: auto ->" in out, out


def test_info_json(tmp_path):
    data = json.loads(_ok(_cli("info", "--json", cwd=tmp_path)).stdout)
    assert {"vqkernels", "torch", "extension", "ops"} <= data.keys(), sorted(data)
    assert "cpu" in data["ops"]["timestep_embedding"]


PUBLIC_OPS = ("timestep_embedding", "nearest_code", "vector_quantize", "nearest_code_with_stats",
              "residual_nearest_code", "code_counts_and_sums", "ema_update_", "ema_update_stages_",
              "attention", "ddim_step", "layer_norm_modulate", "gated_residual",
              "gated_residual_layer_norm_modulate", "gelu_tanh", "group_norm")


def test_info_shows_every_public_op_and_its_gpu_status(tmp_path):
    out = _ok(_cli("info", cwd=tmp_path)).stdout
    for op in PUBLIC_OPS:
        assert any(line.startswith(op) and " on cpu: auto -> " in line
                   for line in out.splitlines()), f"no {op} line in:\n{out}"
        status = next(line for line in out.splitlines() if line.strip().startswith(f"{op}: "))
        assert "cuda: " in status and "triton on cuda: " in status, status
    assert "not yet run on a GPU" in out or "verified on" in out, out


def test_info_json_gpu_status(tmp_path):
    data = json.loads(_ok(_cli("info", "--json", cwd=tmp_path)).stdout)
    assert set(data["gpu_status"]) == set(PUBLIC_OPS), sorted(data["gpu_status"])
    for op, statuses in data["gpu_status"].items():
        triton_only = op in ("gelu_tanh", "group_norm")
        assert set(statuses) == ({"triton"} if triton_only else {"cuda", "triton"}), (op, statuses)
        assert all(s == "not yet run on a GPU" or s.startswith("verified on ")
                   for s in statuses.values()), (op, statuses)


def test_selftest_command_writes_rows_and_exits_0(tmp_path):
    result = _ok(_cli("selftest", "--device", "cpu", "--ops", "timestep_embedding", "ddim_step",
                      "--json", str(tmp_path / "selftest.json"), cwd=tmp_path))
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["op", "backend", "dtype", "what"], result.stdout
    assert "checks, all passed in" in lines[-2], result.stdout
    data = json.loads((tmp_path / "selftest.json").read_text())
    assert {row["op"] for row in data["rows"]} == {"timestep_embedding", "ddim_step"}
    assert data["passed"] and data["device_type"] == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_selftest_cuda_without_gpu_exits_2(tmp_path):
    result = _cli("selftest", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bench_table_has_timestep_rows(quick_bench):
    stdout = quick_bench[0].stdout
    for backend in ("reference", "cpu"):
        assert any(line.split()[:3] == ["timestep", "N256xD256", backend]
                   for line in stdout.splitlines()), f"no timestep {backend} row in:\n{stdout}"


def test_bench_times_each_adaln_backend_or_says_why_not(quick_bench):
    stdout = quick_bench[0].stdout
    data = json.loads((quick_bench[1] / "bench.json").read_text())
    timed = {(row["shape"], row["backend"]) for row in data["rows"] if row["op"] == "adaln"}
    skipped = {(s["shape"], s["backend"]) for s in data["skipped"] if s["op"] == "adaln"}
    shapes = {shape for shape, _ in timed}
    # four ops (lnmod, residual, fused, gelu), forward and forward + backward; the block forward
    assert len(shapes) == 9 and all((shape, "reference") in timed for shape in shapes), timed
    for shape in shapes:  # ours is timed, or the table says why not
        ours = "vqkernels" if shape.startswith("block-") else "cpu"
        assert ((shape, ours) in timed) != ((shape, ours) in skipped), (shape, stdout)
        if ours == "cpu":
            assert (shape, "compiled") in skipped, "--quick must leave torch.compile out"
    assert "skipped: adaln compiled at " in stdout, stdout


def test_bench_json(quick_bench):
    data = json.loads((quick_bench[1] / "bench.json").read_text())
    assert META_KEYS <= data.keys(), f"missing {META_KEYS - data.keys()}"
    assert {"python", "torch", "triton", "vqkernels"} <= data["versions"].keys()
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert ROW_KEYS <= row.keys(), f"row lacks {ROW_KEYS - row.keys()}: {row}"
        assert row["time_us"] > 0 and row["speedup"] > 0, row
    assert {row["backend"] for row in data["rows"]} >= {"reference", "cpu"}


def test_bench_never_reports_over_100_percent_of_a_ceiling(quick_bench):
    data = json.loads((quick_bench[1] / "bench.json").read_text())
    for row in data["rows"]:
        assert row["ceiling_pct"] is None or 0 < row["ceiling_pct"] <= 100, row
        assert (row["ceiling_pct"] is None) or not row["ceiling_problem"], row
    ceilings = data["ceilings"]
    assert ceilings["source"] == "measured" and ceilings["flops"]["fp32"] > 0
    assert all(level["bytes"] > 0 for level in ceilings["levels"]), ceilings


def test_bench_covers_every_op_family(quick_bench):
    from vqkernels.bench.cases import OP_MODULES

    rows = json.loads((quick_bench[1] / "bench.json").read_text())["rows"]
    shapes = {(row["op"], row["shape"]) for row in rows}
    assert {op for op, _ in shapes} == set(OP_MODULES), sorted(shapes)
    assert ("quantizer", "taming-train-N16384xK1024xD256") in shapes, sorted(shapes)
    if importlib.util.find_spec("vector_quantize_pytorch") is not None:  # a test extra
        assert ("quantizer", "vqp-train-N16384xK1024xD256") in shapes, sorted(shapes)


def test_bench_plot_is_png(quick_bench):
    pytest.importorskip("matplotlib")
    assert (quick_bench[1] / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_bench_cuda_without_gpu_exits_2(tmp_path):
    result = _cli("bench", "--quick", "--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2, result
    assert "no CUDA GPU" in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_bench_unknown_op_is_rejected(tmp_path):
    result = _cli("bench", "--ops", "no-such-op", cwd=tmp_path)
    assert result.returncode != 0
    assert "invalid choice" in result.stderr and "timestep" in result.stderr, result.stderr
