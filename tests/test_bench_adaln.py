"""The adaLN bench family (vqkernels/bench/adaln.py) and what the bench reports about any
family: skipped backends, speed-ups over a second baseline, the targets a run meets.

Tiny shapes, no torch.compile (a compile takes seconds): cheap enough for every CI run.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers import compile_fails_without_a_compiler
from vqkernels.bench import adaln, report, runner, targets
from vqkernels.bench.cases import REFERENCE, Case, why_not_runnable
from vqkernels.nn import ReferenceDiTBlock

CPU = torch.device("cpu")
SHAPE = (2, 3, 4)  # (B, T, D): 24 activations, 8 parameters per (B, D) tensor
BLOCK_SHAPE = (2, 8, 2 * adaln.HEAD_DIM)  # two heads
KINDS = {kind.label: kind for kind in adaln.OP_KINDS}


def _case(label: str, backward: bool) -> Case:
    if label == "block":
        return adaln.block_case(BLOCK_SHAPE, torch.float32, CPU, backward=backward)
    return adaln.op_case(KINDS[label], SHAPE, torch.float32, CPU, backward=backward,
                         compiled=False)


@pytest.mark.parametrize("label, backward, activations, params", [
    ("lnmod", False, 2, 2),  # x read, h written; shift, scale read
    ("lnmod", True, 2 + 3, 2 + 3),  # + grad_h and x read, dx written; scale read, 2 grads
    ("residual", False, 3, 1),  # x, y read, out written; gate read
    ("residual", True, 3 + 3, 1 + 2),  # + grad and y read, dy written; gate read, dgate
    ("fused", False, 4, 3),  # x, y read, x_new, h written; gate, shift, scale read
    ("fused", True, 4 + 6, 3 + 5),  # + grad_h, grad_x_new, x_new, y read, dx, dy written
])
def test_bytes_count_each_tensor_once(label, backward, activations, params):
    assert _case(label, backward).bytes == 4 * (24 * activations + 8 * params)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("label", [*sorted(KINDS), "block"])
def test_every_row_computes_what_the_reference_row_computes(label, backward):
    case = _case(label, backward)
    expected = _tensors(case.fns[REFERENCE]())
    for backend, fn in case.fns.items():
        for got, want in zip(_tensors(fn()), expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-4, msg=backend)


@pytest.mark.parametrize("backward", [False, True])
def test_block_flops_are_what_its_twin_runs(backward):
    b, t, d = BLOCK_SHAPE
    twin = ReferenceDiTBlock(d, d // adaln.HEAD_DIM)
    x, c = torch.randn(BLOCK_SHAPE, requires_grad=True), torch.randn(b, d, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        out = twin(x, c)
        if backward:
            out.backward(torch.randn_like(out))
    assert _case("block", backward).flops == counter.get_total_flops()


def _tensors(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def test_parameters_are_strided_chunks_of_one_modulation_tensor():
    names = ("shift", "scale", "gate", "h")
    inputs = dict(zip(names, adaln._inputs(SHAPE, torch.float32, CPU, True, names)))
    b, t, d = SHAPE
    for name in names[:3]:
        assert inputs[name].stride() == (6 * d, 1) and inputs[name].is_leaf, name
    assert inputs["h"].shape == (b, t, 4 * d)  # the MLP's hidden, gelu's input


def test_quick_cases_leave_compile_out_and_say_so():
    found = adaln.cases(CPU, quick=True)
    assert [case.shape.split("-")[0] for case in found] == [*KINDS, *KINDS, "block"]
    for case in found[:-1]:
        assert "--quick" in case.skipped[adaln.COMPILED], case.label
        assert set(case.fns).isdisjoint(case.skipped), case.label


def test_a_compile_that_fails_is_skipped_with_its_reason(monkeypatch):
    compile_fails_without_a_compiler(monkeypatch)
    case = adaln.op_case(KINDS["lnmod"], SHAPE, torch.float32, CPU, backward=False,
                         compiled=True)
    assert case.skipped[adaln.COMPILED] == "RuntimeError: no C++ compiler"
    assert adaln.COMPILED not in case.fns


def test_only_the_named_errors_mean_cannot_run_here():
    def unregistered():
        raise NotImplementedError("Could not run 'vqkernels::op' on 'CPU'. Long story")

    assert why_not_runnable(unregistered, (NotImplementedError,)) == \
        "NotImplementedError: Could not run 'vqkernels::op' on 'CPU'"
    assert why_not_runnable(lambda: None, (NotImplementedError,)) is None
    with pytest.raises(ValueError):
        why_not_runnable(lambda: int("x"), (NotImplementedError,))


def test_every_adaln_target_matches_a_shape_the_family_runs():
    shapes = {"cuda": (adaln.GPU_SHAPES, torch.bfloat16), "cpu": (adaln.CPU_SHAPES, torch.float32)}
    for target in (t for t in targets.TARGETS if t.family == "adaln"):
        dims, dtype = shapes[target.device]
        runs = [(kind, shape) for kind in KINDS for shape in dims]
        runs.append(("block", adaln.BLOCK_SHAPES[target.device]))
        labels = [adaln.case_label(kind, backward, shape, dtype) for kind, shape in runs
                  for backward in (False, True)]
        assert any(target.matches({"op": "adaln", "shape": s}) for s in labels), target


def _row(backend: str, time_us: float, speedup: float, **extra) -> dict:
    return {"op": "adaln", "shape": "lnmod-fwd-64x256x1152-float32", "backend": backend,
            "device": "cpu", "time_us": time_us, "speedup": speedup, "achieved": 1.0,
            "achieved_unit": "GB/s", "memory_level": "DRAM", "floor_us": 1.0,
            "ceiling_pct": 10.0, "x_from_floor": 10.0, "peak_mib": None, **extra}


def test_run_case_compares_each_row_with_the_other_baselines():
    case = Case(op="t", shape="s", bytes=4, fns={REFERENCE: lambda: None, "compiled": lambda: None},
                baselines=("compiled", "absent"))
    ceilings = {"levels": [], "bandwidth": None, "flops": {}}
    rows = runner.run_case(case, CPU, ceilings, quick=True)
    assert all(set(row["speedups"]) == {"compiled"} for row in rows), rows


def test_table_shows_skips_second_baseline_and_cpu_targets():
    rows = [_row(REFERENCE, 300.0, 1.0, speedups={"compiled": 0.5}),
            _row("compiled", 150.0, 2.0, speedups={"compiled": 1.0}),
            _row("cpu", 100.0, 3.0, speedups={"compiled": 1.5})]
    skipped = [{"op": "adaln", "shape": s, "backend": "triton", "reason": "no GPU"}
               for s in ("a", "b")]
    meta = {"device": "test CPU", "skipped": skipped,
            "ceilings": {"source": "measured", "levels": [], "bandwidth": 1e10, "flops": {}}}
    table = report.format_table(rows, meta)
    assert "also vs" in table.splitlines()[0] and "1.5x compiled" in table
    assert "skipped: adaln triton at a, b: no GPU" in table
    assert ("target: adaln each adaLN op forward vs eager (CPU) (>= 2x reference): "
            "lnmod-fwd-64x256x1152-float32 cpu: 3x, met") in table
    assert "forward + backward vs eager (CPU) (>= 1.5x reference): no row of ours" in table
    assert "layer_norm_modulate forward vs eager" not in table, "a GPU target judged CPU rows"
