"""scripts/gpu_check.sh without a GPU, and its summary formatter on recorded inputs.

The inputs under tests/data/gpu_check/ are described in its README: hand-made
files in the formats the script leaves behind (a failed selftest, a timed-out
pytest step, memcheck errors), and one real CPU bench run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
import torch

import vqkernels
from vqkernels.bench import evidence, placeholders, report, summary, targets
from helpers import run_python

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "gpu_check"
FIVE_FILES = {"summary.md", "bench.json", "bench.png", "pytest_cuda.xml", "logs.tar.gz"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _summarize(tmp_path, **inputs) -> str:
    """summary.md for the given inputs (paths under DATA by file name, or None)."""
    argv = ["--out", str(tmp_path / "summary.md"), "--machine", "NVIDIA H200 (test input)"]
    for flag, name in inputs.items():
        if name is not None:
            argv += [f"--{flag.replace('_', '-')}", str(DATA / name)]
    assert summary.main(argv) == 0
    return (tmp_path / "summary.md").read_text()


def _table_row(text: str, family: str, backend: str) -> list[str]:
    for line in text.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if cells[:2] == [family, backend]:
            return cells
    raise AssertionError(f"no {family} / {backend} row in:\n{text}")


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> str:
    return _summarize(tmp_path_factory.mktemp("full"), steps="steps.tsv", junit="pytest_cuda.xml",
                      selftest="selftest.json", sanitizer_log="sanitizer.log",
                      bench="bench_gpu.json")


@pytest.mark.skipif(torch.cuda.is_available() or shutil.which("nvidia-smi") is not None,
                    reason="a GPU is present: the script would run every GPU step")
def test_script_without_gpu_leaves_five_files_and_marks_gpu_steps_not_run(tmp_path):
    env = dict(os.environ, GPU_CHECK_SKIP_BUILD="1")
    package_root = str(Path(vqkernels.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert {p.name for p in out.iterdir()} == FIVE_FILES
    text = (out / "summary.md").read_text()
    assert result.stdout.rstrip().endswith(text.rstrip()), "summary.md is not printed last"
    assert "No NVIDIA GPU here" in result.stdout
    for name in ("selftest", "pytest-cuda", "sanitizer", "bench"):
        assert f"| {name} | not run | - | - | no GPU |" in text, text
    assert "| build | not run | - | - | GPU_CHECK_SKIP_BUILD=1 |" in text, text
    assert "| info | ok | 0 |" in text, text
    assert _table_row(text, "search", "-")[2:5] == ["not run (no GPU)"] * 3
    _check_stand_ins(out)
    with tarfile.open(out / "logs.tar.gz") as logs:
        names = set(logs.getnames())
    assert {"logs/steps.tsv", "logs/info.txt", "logs/summary.log"} <= names, names


def test_default_sanitizer_selection_covers_every_kernel_family():
    script = (ROOT / "scripts" / "gpu_check.sh").read_text()
    expression = re.search(r'^SANITIZER_K="\$\{SANITIZER_K:-(.*)\}"$', script, re.M).group(1)
    result = run_python("-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                        "no:cacheprovider", "-k", expression, str(ROOT / "tests"), timeout=120)
    ids = [line for line in result.stdout.splitlines() if "::" in line]
    covered = {(t.family, t.backend) for t in (evidence.classify(i, "passed") for i in ids)}
    wanted = {(family, backend) for family in ("timestep", "search", "ema", "ddim", "attention", "adaln")
              for backend in ("cuda", "triton")}
    assert wanted <= covered, f"not under memcheck: {sorted(wanted - covered)}\n{result.stdout}"
    assert len(ids) <= 60, f"{len(ids)} tests: the memcheck step has 90 s, keep its subset focused"


def _check_stand_ins(out: Path) -> None:
    assert json.loads((out / "bench.json").read_text()) == {
        "not_run": "no benchmark results: bench not run (no GPU)", "rows": []}
    suite = ElementTree.parse(out / "pytest_cuda.xml").getroot().find("testsuite")
    assert suite.get("tests") == "0"
    assert "not run (no GPU)" in suite.find("properties/property").get("value")
    assert (out / "bench.png").read_bytes()[:8] == PNG_MAGIC


def test_junit_is_sorted_into_families_and_backends(full):
    partial = " (partial: timed out)"  # steps.tsv: the step timed out after pytest wrote junit
    assert _table_row(full, "search", "triton")[2] == "**1 failed**, 1 passed, 1 skipped" + partial
    assert _table_row(full, "search", "cuda")[2] == "1 passed" + partial
    assert _table_row(full, "ema", "cuda")[2] == "**1 error**" + partial
    assert _table_row(full, "ema", "reference")[2] == "1 passed" + partial
    assert _table_row(full, "ema", "any")[2] == "1 passed" + partial  # test_kmeans names none
    assert _table_row(full, "ddim", "triton")[2] == "1 skipped" + partial  # xunit1-style case
    assert _table_row(full, "other", "triton")[2] == "1 passed" + partial
    assert "test failed: tests/test_search.py::test_nearest_code_random_data" \
           "[53-97-8-ieee-triton-cuda]" in full


def test_junit_of_a_step_that_finished_is_complete(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("pytest-cuda\tfailed\t1\t99.0\tlimit 150 s\n")
    assert summary.main(["--out", str(tmp_path / "s.md"), "--steps", str(steps),
                         "--junit", str(DATA / "pytest_cuda.xml")]) == 0
    assert _table_row((tmp_path / "s.md").read_text(), "search", "cuda")[2] == "1 passed"


def test_timed_out_pytest_step_is_read_from_its_log(tmp_path):
    text = _summarize(tmp_path, steps="steps.tsv", junit="missing.xml",
                      pytest_log="pytest_cuda_cut.log")
    assert _table_row(text, "attention", "cuda")[2] == "1 passed (partial: from the log)"
    assert _table_row(text, "attention", "triton")[2] == "**1 failed** (partial: from the log)"
    assert _table_row(text, "ddim", "cuda")[2] == "1 skipped (partial: from the log)"
    assert "shape0-triton-cuda" not in text, "a test cut off before its outcome was counted"
    assert "| pytest-cuda | **timed out** | 124 | 150.0 |" in text


def test_memcheck_errors_are_charged_to_the_running_test(full):
    assert _table_row(full, "ema", "triton")[4] == "**2 errors** in 1 of 1 test"
    assert _table_row(full, "ema", "cuda")[4] == "clean (1 test)"
    assert _table_row(full, "timestep", "cuda")[4] == "clean (1 test)"  # failed, but ran
    assert _table_row(full, "attention", "cuda")[4] == "no test ran"
    assert "memcheck: 1 error outside any test" in full
    log = evidence.read_sanitizer_log(DATA / "sanitizer.log")
    assert len(log.tests) == 4 and log.total == 3 and log.outside_tests == 0
    assert "tests/test_search.py::test_nearest_code_random_data[31-64-33-bf16-cuda]" \
        not in log.tests, "a test named only in the short summary counted as run"


def test_memcheck_does_not_call_skipped_tests_clean(tmp_path):
    log = tmp_path / "sanitizer.log"
    log.write_text("========= COMPUTE-SANITIZER\n"
                   "tests/test_ddim.py::test_parity_odd_shapes[shape0-cuda] SKIPPED (no GPU)\n"
                   "tests/test_ddim.py::test_parity_odd_shapes[shape0-triton-cuda] PASSED\n"
                   "========= ERROR SUMMARY: 0 errors\n")
    assert summary.main(["--out", str(tmp_path / "s.md"), "--sanitizer-log", str(log)]) == 0
    text = (tmp_path / "s.md").read_text()
    assert _table_row(text, "ddim", "cuda")[4] == "no test ran (1 skipped)"
    assert _table_row(text, "ddim", "triton")[4] == "clean (1 test)"


def test_selftest_failures_are_counted_and_listed(full):
    assert _table_row(full, "search", "cuda")[3] == "**1 failed** of 1"
    assert _table_row(full, "ema", "triton")[3] == "**1 failed** of 1"
    assert _table_row(full, "quantizer", "cuda")[3] == "1 passed"  # vector_quantize
    assert _table_row(full, "attention", "cuda")[3] == \
        "unavailable: vqkernels._C was built without CUDA kernels"
    assert "selftest failed: ema_update_ triton float16 run: RuntimeError: out of resources" in full


def test_targets_against_the_fastest_baseline():
    rows = json.loads((DATA / "bench_gpu.json").read_text())["rows"]
    found = {(v["target"].what, v["row"]["backend"]): v for v in targets.evaluate(rows) if v["row"]}
    best_sdpa = found[("d=72 bf16 forward vs the best SDPA backend", "triton")]
    assert best_sdpa["value"] == pytest.approx(100 / 120) and best_sdpa["met"] is False
    assert found[("d=72 bf16 forward vs SDPA flash", "cuda")]["value"] == pytest.approx(140 / 95)
    assert found[("EMA update vs one-hot matmul", "cuda")]["value"] == pytest.approx(150)
    share = found[("fused step + CFG at (256,4,64,64): share of copy bandwidth", "cuda")]
    assert share["value"] == 65.0 and share["met"] is False
    with_stats = [v for v in targets.evaluate(rows) if v["row"] and "stats" in v["row"]["shape"]]
    assert not with_stats, "the -with-stats rows matched a plain search target"


def test_targets_table_and_ceilings(full):
    assert "Bench: NVIDIA H200, 33 rows; ceilings (table (H200)): HBM copy 4300.0 GB/s; " \
           "bf16 790 TFLOP/s; measured at start (% meas): HBM copy 4200.0 GB/s" in full
    assert "| search | bf16 K=16384 D=256 vs torch bf16 matmul + argmin | " \
           "N65536xK16384xD256-bf16 | cuda | 5x | >= 6x reference | **no** |" in full
    assert "| search | ieee K=16384 D=256 vs torch matmul + argmin | no row at this shape" in full
    assert _table_row(full, "search", "triton")[5].startswith("2 of 3 met; worst 12x vs >= 15x")
    assert _table_row(full, "ddim", "triton")[6] == "71% (measured ceiling: 72%)"
    assert _table_row(full, "timestep", "cuda")[6] == "-; 1 ceiling problem"
    assert "ceiling problem: timestep N256xD256 cuda: ran in 4 us" in full


def test_auto_decisions(full):
    assert "- ema on cuda: cuda faster than triton at every shape (1; by 1.3x) -> auto order " \
           "cuda, triton" in full
    assert "- search on cuda: depends on shape (triton faster at N65536xK16384xD256-bf16, " \
           "N65536xK16384xD256-tf32; cuda faster at N65536xK16384xD8-bf16)" in full
    assert "- search with stats on cuda: triton faster than cuda" in full, \
        "the fused search + stats is one dispatch of its own"


def test_cpu_bench_is_not_judged_against_gpu_targets(tmp_path):
    text = _summarize(tmp_path, steps="steps.tsv", bench="bench_cpu.json")
    assert "Not judged: the bench ran on AMD EPYC" in text and "H100/H200" in text
    assert _table_row(text, "ddim", "cpu")[6].endswith("%")
    assert _table_row(text, "search", "cpu")[5] == "-", "a CPU row was judged against a target"


def test_missing_inputs_are_not_run_and_get_stand_ins(tmp_path):
    steps = tmp_path / "steps.tsv"
    steps.write_text("bench\tnot run\t-\t-\tno time left of the 540 s budget\n"
                     "pytest-cuda\ttimed out\t124\t150.0\tlimit 150 s\n")
    paths = {name: tmp_path / name for name in ("bench.json", "bench.png", "pytest_cuda.xml")}
    assert summary.main(["--steps", str(steps), "--out", str(tmp_path / "summary.md"),
                         "--bench", str(paths["bench.json"]), "--plot", str(paths["bench.png"]),
                         "--junit", str(paths["pytest_cuda.xml"]),
                         "--selftest", str(tmp_path / "none.json"), "--fill-missing"]) == 0
    text = (tmp_path / "summary.md").read_text()
    cells = _table_row(text, "search", "-")
    assert cells[2:5] == ["no result (pytest-cuda timed out, exit 124)", "not run", "not run"]
    assert "Not judged: bench not run (no time left of the 540 s budget)." in text
    assert json.loads(paths["bench.json"].read_text())["rows"] == []
    assert "timed out (exit 124)" in paths["pytest_cuda.xml"].read_text()
    assert paths["bench.png"].read_bytes()[:8] == PNG_MAGIC


def test_a_bench_without_plot_gets_a_stand_in_and_can_be_plotted_again(tmp_path):
    bench, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    shutil.copy(DATA / "bench_cpu.json", bench)
    steps = {"bench": evidence.Step("bench", "ok", 0, 90.0)}
    assert placeholders.fill(steps, bench=str(bench), plot=str(plot), junit=None) == [str(plot)]
    assert bench.read_bytes() == (DATA / "bench_cpu.json").read_bytes()
    pytest.importorskip("matplotlib")
    plot.unlink()
    assert report.main([str(bench), str(plot)]) == 0
    assert plot.read_bytes()[:8] == PNG_MAGIC
    assert report.main([str(DATA / "steps.tsv"), str(plot)]) != 0


def test_test_modules_map_to_their_op_family():
    from vqkernels.bench.evidence import family_of_module

    expected = {"test_search_kernels": "search", "test_search_kernel_limits": "search",
                "test_reference_search": "search", "test_reference_ema": "ema",
                "test_reference_attention": "attention", "test_vector_quantize": "quantizer",
                "test_ddim": "ddim", "test_reference_adaln": "adaln", "test_dit_block": "adaln",
                "test_layouts": "other"}
    assert {m: family_of_module(m) for m in expected} == expected


def test_a_faulted_cuda_context_is_told_from_an_ordinary_failure():
    """conftest ends an xdist worker on these (seen on the H200, 2026-12-04), not on others."""
    from helpers import breaks_cuda_context

    fault = RuntimeError("CUDA error: an illegal memory access was encountered\n"
                         "Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/...")
    assert breaks_cuda_context(fault)
    assert not breaks_cuda_context(RuntimeError(
        "CUDA error: CUBLAS_STATUS_INTERNAL_ERROR when calling `cublasCreate(handle)`"))
    assert not breaks_cuda_context(AssertionError("attention forward: max error 6.3e-01"))
