"""Reference nearest-code search and vector quantization vs hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import assert_close
from vqkernels.reference import search

F64 = torch.float64


def _t(rows, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, requires_grad=requires_grad)


# --------------------------------------------------------------- nearest_code


def test_l2_one_dimensional_with_ties_to_lowest_index():
    codebook = _t([[0.0], [2.0], [5.0]])
    z = _t([[0.9], [1.0], [4.0], [3.5], [-7.0]])
    indices, distances = search.nearest_code(z, codebook)
    # 1.0 is equidistant from 0 and 2, 3.5 from 2 and 5: the lower index wins.
    assert indices.tolist() == [0, 0, 2, 1, 0]
    assert_close(distances, [0.81, 1.0, 1.0, 2.25, 49.0], "distances")
    assert indices.dtype == torch.int64 and distances.dtype == F64


def test_l2_two_dimensional_hand_case():
    codebook = _t([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    z = _t([[3.0, 1.0], [-0.5, -2.0], [0.0, 0.6]])
    indices, distances = search.nearest_code(z, codebook)
    # [3,1]: 5, 9, 20.  [-.5,-2]: 6.25, 9.25, 1.25.  [0,.6]: 1.36, .16, 3.56.
    assert indices.tolist() == [0, 2, 1]
    assert_close(distances, [5.0, 1.25, 0.16], "distances")


def test_cosine_hand_case_differs_from_l2():
    codebook = _t([[1.0, 0.0], [0.0, 10.0], [-3.0, 0.0]])
    z = _t([[1.0, 1.2], [2.0, 2.0], [-1.0, 0.1], [0.0, 1e-3]])
    indices, distances = search.nearest_code(z, codebook, metric="cosine")
    # [1, 1.2] is nearer [1, 0] in l2 but at a smaller angle to [0, 10].
    # [2, 2] is at 45 degrees to codes 0 and 1: tie, lowest index.
    assert indices.tolist() == [1, 0, 2, 1]
    expected = [
        1 - 1.2 / math.sqrt(2.44),
        1 - 1 / math.sqrt(2),
        1 - 1 / math.sqrt(1.01),
        0.0,
    ]
    assert_close(distances, expected, "cosine distances")
    assert search.nearest_code(z[:1], codebook)[0].item() == 0


def test_cosine_zero_vector_is_at_distance_one_from_every_code():
    codebook = _t([[1.0, 2.0], [-3.0, 0.5]])
    indices, distances = search.nearest_code(_t([[0.0, 0.0]]), codebook, metric="cosine")
    assert indices.tolist() == [0]
    assert_close(distances, [1.0], "distance of the zero vector")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_empty_batch(metric, dtype, generator):
    indices, distances = search.nearest_code(
        torch.empty(0, 7, dtype=dtype), torch.randn(5, 7, generator=generator).to(dtype), metric
    )
    assert indices.shape == (0,) and indices.dtype == torch.int64
    assert distances.shape == (0,)
    assert distances.dtype == (F64 if dtype == F64 else torch.float32)


def test_single_code_picks_it_with_exact_distance(generator):
    z = torch.randn(13, 5, generator=generator, dtype=F64)
    code = torch.randn(1, 5, generator=generator, dtype=F64)
    indices, distances = search.nearest_code(z, code)
    assert indices.tolist() == [0] * 13
    assert_close(distances, ((z - code) ** 2).sum(dim=1), "K=1 distances")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_searched_in_float32(dtype, generator):
    z = torch.randn(31, 6, generator=generator).to(dtype)
    codebook = torch.randn(11, 6, generator=generator).to(dtype)
    indices, distances = search.nearest_code(z, codebook)
    ref_indices, ref_distances = search.nearest_code(z.float(), codebook.float())
    assert distances.dtype == torch.float32
    assert torch.equal(indices, ref_indices) and torch.equal(distances, ref_distances)


def test_unknown_metric_names_metric():
    with pytest.raises(ValueError, match="metric"):
        search.nearest_code(torch.zeros(2, 3), torch.ones(4, 3), metric="dot")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_search_matches_single_chunk(monkeypatch, metric, generator):
    z = torch.randn(103, 9, generator=generator, dtype=F64)
    codebook = torch.randn(17, 9, generator=generator, dtype=F64)
    whole_idx, whole_dist = search.nearest_code(z, codebook, metric)
    monkeypatch.setattr(search, "_CHUNK_ELEMENTS", 10 * 17 * 9)  # 10 rows: 11 chunks
    chunk_idx, chunk_dist = search.nearest_code(z, codebook, metric)
    assert torch.equal(chunk_idx, whole_idx) and torch.equal(chunk_dist, whole_dist)


def test_l2_distance_is_exact_far_from_the_origin():
    # |z|^2 - 2 z.e + |e|^2 in float32 would lose every digit here (ulp of 1e8 is 8).
    codebook = torch.tensor([[10000.0], [10000.5]])
    z = torch.tensor([[10000.2], [10000.3]])
    indices, distances = search.nearest_code(z, codebook)
    assert indices.tolist() == [0, 1]
    exact = (z.double() - codebook.double()[indices]).square().squeeze(1)
    assert_close(distances.double(), exact, "far-from-origin distances", atol=0, rtol=1e-6)


@pytest.mark.parametrize("n, k, d", [(1, 1, 1), (37, 19, 3), (64, 257, 8)])
def test_search_result_is_a_true_minimum(n, k, d, generator):
    z = torch.randn(n, d, generator=generator, dtype=F64)
    codebook = torch.randn(k, d, generator=generator, dtype=F64)
    indices, distances = search.nearest_code(z, codebook)
    brute = torch.stack([torch.stack([((zi - e) ** 2).sum() for e in codebook]) for zi in z])
    assert_close(distances, ((z - codebook[indices]) ** 2).sum(dim=1), "chosen distance")
    assert_close(distances, brute.min(dim=1).values, "minimum distance")


# ------------------------------------------------------------ vector_quantize

Z_HAND = [[0.2, 0.4], [0.9, 0.6]]
CODEBOOK_HAND = [[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]]  # code 2 is never chosen
MSE_HAND = (0.04 + 0.16 + 0.01 + 0.16) / 4


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("beta", [0.25, 0.7])
def test_vector_quantize_loss_and_gradients_by_hand(legacy, beta):
    z = _t(Z_HAND, requires_grad=True)
    codebook = _t(CODEBOOK_HAND, requires_grad=True)
    z_q, loss, indices = search.vector_quantize(z, codebook, beta=beta, legacy=legacy)

    assert indices.tolist() == [0, 1]
    assert_close(z_q.detach(), [[0.0, 0.0], [1.0, 1.0]], "z_q value")
    # Both conventions give the same value; they differ in where beta goes.
    assert_close(loss.detach(), (1 + beta) * MSE_HAND, "loss")

    loss.backward()
    z_weight, code_weight = (1.0, beta) if legacy else (beta, 1.0)
    zq = _t([[0.0, 0.0], [1.0, 1.0]])
    assert_close(z.grad, 2 * z_weight * (_t(Z_HAND) - zq) / 4, "dloss/dz")
    expected_code_grad = _t([[-0.2, -0.4], [0.1, 0.4], [0.0, 0.0]]) * 2 * code_weight / 4
    assert_close(codebook.grad, expected_code_grad, "dloss/dcodebook")


def test_vector_quantize_codebook_gradient_sums_over_assigned_rows():
    z = _t([[0.1], [-0.3], [2.2]], requires_grad=True)
    codebook = _t([[0.0], [2.0]], requires_grad=True)
    _, loss, indices = search.vector_quantize(z, codebook, beta=0.5, legacy=True)
    assert indices.tolist() == [0, 0, 1]
    loss.backward()
    # code 0: (0 - .1) + (0 + .3) = .2 ; code 1: 2 - 2.2 = -.2 ; times 2 * beta / 3
    assert_close(codebook.grad, _t([[0.2], [-0.2]]) * 2 * 0.5 / 3, "dloss/dcodebook")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_straight_through_gradient_is_identity(metric, generator):
    z = torch.randn(7, 4, generator=generator, dtype=F64, requires_grad=True)
    codebook = torch.randn(5, 4, generator=generator, dtype=F64, requires_grad=True)
    upstream = torch.randn(7, 4, generator=generator, dtype=F64)
    z_q, _, _ = search.vector_quantize(z, codebook, metric=metric)
    (z_q * upstream).sum().backward()
    if metric == "l2":
        assert_close(z.grad, upstream, "d z_q / d z")
    else:  # identity onto the normalized z, then through F.normalize
        z_ref = z.detach().clone().requires_grad_(True)
        (torch.nn.functional.normalize(z_ref, dim=-1) * upstream).sum().backward()
        assert_close(z.grad, z_ref.grad, "d z_q / d z")
    assert codebook.grad is None or not codebook.grad.any()


def test_vector_quantize_cosine_hand_case():
    z = _t([[3.0, 4.0]])
    codebook = _t([[2.0, 0.0], [0.0, 3.0]])
    z_q, loss, indices = search.vector_quantize(z, codebook, beta=0.25, metric="cosine")
    # z/|z| = [.6, .8]: code 1 (cos .8), normalized code [0, 1].
    assert indices.tolist() == [1]
    assert_close(z_q, [[0.0, 1.0]], "normalized code")
    assert_close(loss, 1.25 * (0.36 + 0.04) / 2, "loss on normalized vectors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_vector_quantize_dtypes(dtype, generator):
    z = torch.randn(9, 3, generator=generator).to(dtype)
    codebook = torch.randn(4, 3, generator=generator).to(dtype)
    z_q, loss, indices = search.vector_quantize(z, codebook)
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(z_q, codebook[indices])  # z + sg(zq - z): up to one rounding


def test_vector_quantize_empty_batch_has_zero_loss():
    z_q, loss, indices = search.vector_quantize(torch.empty(0, 3), torch.ones(4, 3))
    assert z_q.shape == (0, 3) and indices.shape == (0,) and loss.item() == 0.0
