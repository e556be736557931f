"""The bench keeps what it measured when one backend breaks or the run is interrupted."""
import pytest
import torch

from vqkernels.bench import runner
from vqkernels.bench.cases import REFERENCE, Case

CPU = torch.device("cpu")


def _case(shape: str, **fns) -> Case:
    return Case(op="toy", shape=shape, fns={REFERENCE: lambda: torch.ones(8) * 2, **fns},
                bytes=64)


def _raise(error: BaseException):
    def fn():
        raise error
    return fn


def test_a_failing_backend_loses_only_its_own_row(capsys):
    failures = []
    rows = runner.run([_case("a", broken=_raise(RuntimeError("boom")))], CPU, {}, quick=True,
                      progress=False, failures=failures)
    assert [row["backend"] for row in rows] == [REFERENCE]
    assert failures == [{"op": "toy", "shape": "a", "backend": "broken",
                         "error": "RuntimeError: boom"}]
    assert "toy a broken failed: RuntimeError: boom" in capsys.readouterr().err


def test_without_a_failures_list_a_failing_backend_raises():
    with pytest.raises(RuntimeError, match="boom"):
        runner.run([_case("a", broken=_raise(RuntimeError("boom")))], CPU, {}, quick=True,
                   progress=False)


def test_an_interrupt_returns_the_rows_measured_so_far(capsys):
    cases = [_case("a"), _case("b", interrupted=_raise(KeyboardInterrupt())), _case("c")]
    rows = runner.run(cases, CPU, {}, quick=True, progress=False)
    assert [(row["shape"], row["backend"]) for row in rows] == [("a", REFERENCE)]
    assert "interrupted after 1 of 3 cases" in capsys.readouterr().err
