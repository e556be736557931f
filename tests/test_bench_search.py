"""The search bench family's rows compute what its reference row computes."""
import pytest
import torch

from vqkernels.bench import search
from vqkernels.bench.cases import REFERENCE


def chosen_codes(name, result):
    if name == search.FAISS:  # (distances, labels), each (N, 1)
        return torch.from_numpy(result[1][:, 0])
    return result[0] if isinstance(result, tuple) else result


def test_cpu_rows_agree_with_the_reference_row():
    case = search._case(torch.device("cpu"), 50, 40, 8, torch.float32, "ieee")
    expected = case.fns[REFERENCE]()
    for name, fn in case.fns.items():
        assert torch.equal(chosen_codes(name, fn()), expected), name


def test_faiss_is_a_cpu_baseline_when_installed():
    pytest.importorskip("faiss")
    case = search._case(torch.device("cpu"), 50, 40, 8, torch.float32, "ieee")
    assert search.FAISS in case.fns and case.baselines == (search.FAISS,)
