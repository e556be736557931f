"""``vqkernels.selftest`` in-process on the CPU: every op and backend passes, the table and JSON
have their shape, and a backend that computes wrong or raises makes a failed row and exit 1."""
import contextlib
import dataclasses
import io
import json

import pytest
import torch

import vqkernels
from vqkernels import _ext
from vqkernels.__main__ import main
from vqkernels._selftest import OPS, selftest
from vqkernels._selftest_cases import CASES
from vqkernels._selftest_cases import K
from vqkernels.ops import search, timestep
from helpers import INTERPRETER

ROW_KEYS = {"op", "dispatch", "backend", "dtype", "what", "error", "allowed", "passed", "message"}
DOCUMENT_KEYS = {"device", "device_type", "capability", "versions", "date", "triton_interpret",
                 "seed", "seconds", "complete", "passed", "rows", "unavailable", "gpu_status"}
# every output and gradient each op is checked on
WHATS = {
    "timestep_embedding": {"forward", "grad t"},
    "gelu_tanh": {"forward", "in place", "grad x"},
    "group_norm": {f"{layout} {what}" for layout in ("nchw", "nhwc")
                   for what in ("y", "grad x", "grad w", "grad b")},
    "nearest_code": {"indices", "distances"},
    "residual_nearest_code": {f"stage {q} {what}" for q in range(3)
                              for what in ("indices", "counts", "sums")} | {"quantized"},
    "vector_quantize": {"z_q", "loss", "grad z", "grad codebook"},
    "nearest_code_with_stats": {"indices", "distances", "counts", "sums"},
    "code_counts_and_sums": {"counts", "sums"},
    "ema_update_": {"cluster_size", "embed_sum", "codebook"},
    "ema_update_stages_": {f"stage {q} {name}" for q in range(2)
                           for name in ("cluster_size", "embed_sum", "codebook")},
    "attention": {"out", "grad q", "grad k", "grad v"},
    "ddim_step": {"prev_sample", "pred_original_sample"},
    "layer_norm_modulate": {"h", "grad x", "grad shift", "grad scale"},
    "gated_residual": {"x_new", "grad x", "grad gate", "grad y"},
    "gated_residual_layer_norm_modulate": {"x_new", "h", "grad x", "grad gate", "grad y",
                                           "grad shift", "grad scale"},
}


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Every op on the CPU: the returned rows, the printed table, the JSON document."""
    path = tmp_path_factory.mktemp("selftest") / "selftest.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rows = vqkernels.selftest("cpu", json_path=str(path))
    return rows, out.getvalue(), json.loads(path.read_text())


def test_every_op_passes_on_every_backend_here(full_run):
    rows = full_run[0]
    failed = [row for row in rows if not row["passed"]]
    assert not failed, failed
    backends = {"reference"} | ({"cpu"} if _ext._C is not None else set()) \
        | ({"triton"} if INTERPRETER else set())
    for op in OPS:
        assert {r["backend"] for r in rows if r["op"] == op} == backends, op
        for backend in backends:
            whats = {r["what"] for r in rows if r["op"] == op and r["backend"] == backend
                     and r["dtype"] == "float32"}
            assert whats == WHATS[op], (op, backend)


def test_dtypes_follow_the_backend(full_run):
    checked = {(r["op"], r["backend"], r["dtype"]) for r in full_run[0]}
    assert ("attention", "reference", "bfloat16") in checked
    assert not {d for op, b, d in checked if b == "triton"} - {"float32"}  # the interpreter
    if _ext._C is not None:
        assert {("attention", "cpu", "float64"), ("nearest_code", "cpu", "bfloat16"),
                ("ddim_step", "cpu", "float16")} <= checked
        assert ("attention", "cpu", "bfloat16") not in checked  # the C++ kernel is fp32 / fp64


def test_rows_hold_an_error_within_its_bound(full_run):
    for row in full_run[0]:
        assert row.keys() == ROW_KEYS, row
        assert 0 <= row["error"] <= row["allowed"] and row["message"] is None, row


def test_the_table_has_a_line_per_row_and_the_verdict(full_run):
    rows, table, _ = full_run
    lines = table.splitlines()
    assert lines[0].split() == ["op", "backend", "dtype", "what", "max", "error", "allowed", "pass"]
    body = [line.split() for line in lines[2:2 + len(rows)]]
    assert [line[:3] for line in body] == [[r["op"], r["backend"], r["dtype"]] for r in rows]
    assert all(line[-1] == "ok" for line in body)
    h200 = "verified on NVIDIA H200 (sm_90), 2026-12-04"  # vqkernels._verified.VERIFIED
    status = [line for line in lines if line.startswith("GPU status: cuda for ")]
    assert any(line.endswith(h200) and "nearest_code" in line for line in status), status
    assert any(line.endswith("not yet run on a GPU") and "attention" in line for line in status)
    assert lines[-1].startswith(f"device cpu: {len(rows)} checks, all passed in ")


def test_the_json_has_rows_device_versions_and_date(full_run):
    rows, _, document = full_run
    assert document.keys() == DOCUMENT_KEYS
    assert document["rows"] == rows and document["passed"] and document["complete"]
    assert (document["device"], document["device_type"], document["capability"]) == \
        ("cpu", "cpu", None)
    assert {"python", "torch", "triton", "vqkernels"} <= document["versions"].keys()
    assert document["date"][:2] == "20" and document["triton_interpret"] == INTERPRETER
    assert {(u["op"], u["backend"]) for u in document["unavailable"]} >= {
        (case.op, "cuda") for case in CASES if "cuda" in case.dispatch.backends}


def perturbed(dispatch, backend, change, monkeypatch):
    """Make ``backend`` of ``dispatch`` return change(its output)."""
    original = dispatch.backends[backend]
    wrong = dataclasses.replace(original, run=lambda *args: change(original.run(*args)))
    monkeypatch.setitem(dispatch.backends, backend, wrong)


def quiet_selftest(ops):
    with contextlib.redirect_stdout(io.StringIO()):
        return selftest("cpu", ops=ops)


def verdicts(rows, backend, dtype="float32"):
    return {row["what"]: row["passed"] for row in rows
            if row["backend"] == backend and row["dtype"] == dtype}


def test_a_slightly_wrong_output_fails_its_rows(monkeypatch):
    perturbed(timestep.DISPATCH, "reference", lambda out: out * (1 + 1e-3), monkeypatch)
    rows = quiet_selftest(["timestep_embedding"])
    assert verdicts(rows, "reference") == {"forward": False, "grad t": False}
    assert all(row["passed"] for row in rows if row["backend"] != "reference")


def test_a_wrong_code_choice_fails_the_search_rule(monkeypatch):
    def next_code(result):
        indices, distances = result
        return (indices + 1) % K, distances

    perturbed(search.DISPATCH, "reference", next_code, monkeypatch)
    rows = quiet_selftest(["nearest_code"])
    assert verdicts(rows, "reference") == {"indices": False, "distances": False}


def test_a_backend_that_raises_is_a_failed_row(monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    original = timestep.DISPATCH.backends["reference"]
    monkeypatch.setitem(timestep.DISPATCH.backends, "reference",
                        dataclasses.replace(original, run=broken))
    rows = quiet_selftest(["timestep_embedding"])
    failed = [row for row in rows if not row["passed"]]
    assert {(r["backend"], r["what"]) for r in failed} == {("reference", "run")}
    assert all("RuntimeError: kernel exploded" in r["message"] for r in failed)
    assert len(failed) == 4  # one per dtype; the other backends still ran


def test_the_command_exits_1_on_a_failure(monkeypatch, tmp_path):
    perturbed(timestep.DISPATCH, "reference", lambda out: out + 1e-2, monkeypatch)
    path = tmp_path / "failed.json"
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["selftest", "--device", "cpu", "--ops", "timestep_embedding",
                     "--json", str(path)])
    assert code == 1
    assert "FAIL" in out.getvalue() and "FAILED" in out.getvalue().splitlines()[-2]
    document = json.loads(path.read_text())
    assert not document["passed"] and not document["complete"]


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="ops must be among"):
        selftest("cpu", ops=["nearest"])
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda'"):
        selftest("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            selftest("cuda")
