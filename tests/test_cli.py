"""``python -m vqkernels info | bench`` run as a user would, in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vqkernels

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
META_KEYS = {"device", "versions", "extension", "date", "host", "ceilings", "rows"}
ROW_KEYS = {"op", "shape", "backend", "time_us", "speedup", "bytes", "flops", "achieved",
            "achieved_unit", "floor_us", "ceiling_pct", "x_from_floor", "peak_mib"}


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI on the same vqkernels this test imported."""
    env = dict(os.environ)
    package_root = str(Path(vqkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "vqkernels", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, (f"exit code {result.returncode}\nstdout:\n{result.stdout}\n"
                                    f"stderr:\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = _ok(_cli("bench", "--quick", "--device", "cpu", "--json", str(out / "bench.json"),
                      "--plot", str(out / "bench.png"), cwd=out))
    return result, out


def test_info_prints_dispatch(tmp_path):
    out = _ok(_cli("info", cwd=tmp_path)).stdout
    assert "vqkernels" in out and "timestep_embedding on cpu: auto ->" in out, out


def test_info_json(tmp_path):
    data = json.loads(_ok(_cli("info", "--json", cwd=tmp_path)).stdout)
    assert {"vqkernels", "torch", "extension", "ops"} <= data.keys(), sorted(data)
    assert "cpu" in data["ops"]["timestep_embedding"]


def test_bench_table_has_timestep_rows(quick_bench):
    stdout = quick_bench[0].stdout
    for backend in ("reference", "cpu"):
        assert any(line.split()[:3] == ["timestep", "N256xD256", backend]
                   for line in stdout.splitlines()), f"no timestep {backend} row in:\n{stdout}"


def test_bench_json(quick_bench):
    data = json.loads((quick_bench[1] / "bench.json").read_text())
    assert META_KEYS <= data.keys(), f"missing {META_KEYS - data.keys()}"
    assert {"python", "torch", "triton", "vqkernels"} <= data["versions"].keys()
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert ROW_KEYS <= row.keys(), f"row lacks {ROW_KEYS - row.keys()}: {row}"
        assert row["time_us"] > 0 and row["speedup"] > 0, row
    assert {row["backend"] for row in data["rows"]} >= {"reference", "cpu"}


def test_bench_covers_every_op_family(quick_bench):
    from vqkernels.bench.cases import OP_MODULES

    rows = json.loads((quick_bench[1] / "bench.json").read_text())["rows"]
    shapes = {(row["op"], row["shape"]) for row in rows}
    assert {op for op, _ in shapes} == set(OP_MODULES), sorted(shapes)
    assert {("quantizer", "taming-train-N16384xK1024xD256"),
            ("quantizer", "vqp-train-N16384xK1024xD256")} <= shapes, sorted(shapes)


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
