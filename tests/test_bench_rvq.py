"""The rvq bench family builds runnable cases whose label, bytes and FLOPs follow the shape."""
import pytest
import torch

from vqkernels.bench import rvq
from vqkernels.bench.cases import REFERENCE


def test_train_case_runs_both_modules_on_the_same_codebooks():
    pytest.importorskip("vector_quantize_pytorch")
    case = rvq._train_case(torch.device("cpu"), 3, 16, 8, 2, 20)
    assert case.op == "rvq" and case.shape == "train-Q3xN40xK16xD8"
    assert case.flops == 2 * 3 * 40 * 16 * 8 and set(case.fns) == {REFERENCE, "vqkernels"}
    for fn in case.fns.values():
        fn()
    modules = [fn.args[0] for fn in case.fns.values()]
    for key, value in modules[0].state_dict().items():  # one EMA step each, from one start
        torch.testing.assert_close(modules[1].state_dict()[key], value, rtol=1e-5, atol=1e-5)


def test_without_vector_quantize_pytorch_the_training_step_is_left_out(monkeypatch):
    monkeypatch.setattr(rvq.importlib.util, "find_spec", lambda name: None)
    assert [case.shape for case in rvq.cases(torch.device("cpu"), quick=True)] == [
        "search-Q8xN16384xK1024xD128", "ema-stages-Q8xK1024xD128"]


def test_ema_case_rows_update_alike():
    """Each row's update from one state: the stages together as each alone."""
    case = rvq._ema_case(torch.device("cpu"), 3, 16, 8)
    assert case.shape == "ema-stages-Q3xK16xD8" and case.bytes == 3 * (12 * 16 + 16 * 8 * 16)
    assert set(case.fns) == {REFERENCE, "cpu"}
    columns = case.fns["cpu"].args[:3]
    start = [[t.clone() for t in column] for column in columns]
    results = {}
    for name, fn in case.fns.items():
        for column, initial in zip(columns, start):
            for t, t0 in zip(column, initial):
                t.copy_(t0)
        fn()
        results[name] = [[t.clone() for t in column] for column in columns]
    for got, want in zip(results["cpu"], results[REFERENCE]):
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_search_case_rows_agree():
    """Every row runs the same search: the torch loop, Q nearest_code calls and the fused op."""
    case = rvq._search_case(torch.device("cpu"), 3, 16, 8, 2, 20)
    assert case.shape == "search-Q3xN40xK16xD8" and case.baselines == (rvq.STAGE_LOOP,)
    assert case.flops == 2 * 3 * 40 * 16 * 8 and {REFERENCE, rvq.STAGE_LOOP} <= set(case.fns)
    results = {name: fn() for name, fn in case.fns.items()}
    for name, (indices, quantized) in results.items():
        assert torch.equal(indices, results[REFERENCE][0]), name
        torch.testing.assert_close(quantized, results[REFERENCE][1], msg=name)
