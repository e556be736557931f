"""Reference nearest-code search, vector quantization and EMA vs hand-computed answers."""

from __future__ import annotations

import math

import pytest
import torch

from vqkernels.reference import ema, search

F64 = torch.float64


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(rows, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, requires_grad=requires_grad)


def _assert_close(actual, expected, what, atol=1e-12, rtol=1e-12):
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs error {err:.3g}\nactual   {actual}\nexpected {expected}"
    )


# --------------------------------------------------------------- nearest_code


def test_l2_one_dimensional_with_ties_to_lowest_index():
    codebook = _t([[0.0], [2.0], [5.0]])
    z = _t([[0.9], [1.0], [4.0], [3.5], [-7.0]])
    indices, distances = search.nearest_code(z, codebook)
    # 1.0 is equidistant from 0 and 2, 3.5 from 2 and 5: the lower index wins.
    assert indices.tolist() == [0, 0, 2, 1, 0]
    _assert_close(distances, [0.81, 1.0, 1.0, 2.25, 49.0], "distances")
    assert indices.dtype == torch.int64 and distances.dtype == F64


def test_l2_two_dimensional_hand_case():
    codebook = _t([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    z = _t([[3.0, 1.0], [-0.5, -2.0], [0.0, 0.6]])
    indices, distances = search.nearest_code(z, codebook)
    # [3,1]: 5, 9, 20.  [-.5,-2]: 6.25, 9.25, 1.25.  [0,.6]: 1.36, .16, 3.56.
    assert indices.tolist() == [0, 2, 1]
    _assert_close(distances, [5.0, 1.25, 0.16], "distances")


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
    _assert_close(distances, expected, "cosine distances")
    assert search.nearest_code(z[:1], codebook)[0].item() == 0


def test_cosine_zero_vector_is_at_distance_one_from_every_code():
    codebook = _t([[1.0, 2.0], [-3.0, 0.5]])
    indices, distances = search.nearest_code(_t([[0.0, 0.0]]), codebook, metric="cosine")
    assert indices.tolist() == [0]
    _assert_close(distances, [1.0], "distance of the zero vector")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_empty_batch(metric, dtype):
    indices, distances = search.nearest_code(
        torch.empty(0, 7, dtype=dtype), torch.randn(5, 7, generator=_gen()).to(dtype), metric
    )
    assert indices.shape == (0,) and indices.dtype == torch.int64
    assert distances.shape == (0,)
    assert distances.dtype == (F64 if dtype == F64 else torch.float32)


def test_single_code_picks_it_with_exact_distance():
    z = torch.randn(13, 5, generator=_gen(1), dtype=F64)
    code = torch.randn(1, 5, generator=_gen(2), dtype=F64)
    indices, distances = search.nearest_code(z, code)
    assert indices.tolist() == [0] * 13
    _assert_close(distances, ((z - code) ** 2).sum(dim=1), "K=1 distances")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_are_searched_in_float32(dtype):
    z = torch.randn(31, 6, generator=_gen(3)).to(dtype)
    codebook = torch.randn(11, 6, generator=_gen(4)).to(dtype)
    indices, distances = search.nearest_code(z, codebook)
    ref_indices, ref_distances = search.nearest_code(z.float(), codebook.float())
    assert distances.dtype == torch.float32
    assert torch.equal(indices, ref_indices) and torch.equal(distances, ref_distances)


def test_unknown_metric_names_metric():
    with pytest.raises(ValueError, match="metric"):
        search.nearest_code(torch.zeros(2, 3), torch.ones(4, 3), metric="dot")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_chunked_search_matches_single_chunk(monkeypatch, metric):
    z = torch.randn(103, 9, generator=_gen(5), dtype=F64)
    codebook = torch.randn(17, 9, generator=_gen(6), dtype=F64)
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
    _assert_close(distances.double(), exact, "far-from-origin distances", atol=0, rtol=1e-6)


@pytest.mark.parametrize("n, k, d", [(1, 1, 1), (37, 19, 3), (64, 257, 8)])
def test_search_result_is_a_true_minimum(n, k, d):
    z = torch.randn(n, d, generator=_gen(7), dtype=F64)
    codebook = torch.randn(k, d, generator=_gen(8), dtype=F64)
    indices, distances = search.nearest_code(z, codebook)
    brute = torch.stack([torch.stack([((zi - e) ** 2).sum() for e in codebook]) for zi in z])
    _assert_close(distances, ((z - codebook[indices]) ** 2).sum(dim=1), "chosen distance")
    _assert_close(distances, brute.min(dim=1).values, "minimum distance")


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
    _assert_close(z_q.detach(), [[0.0, 0.0], [1.0, 1.0]], "z_q value")
    # Both conventions give the same value; they differ in where beta goes.
    _assert_close(loss.detach(), (1 + beta) * MSE_HAND, "loss")

    loss.backward()
    z_weight, code_weight = (1.0, beta) if legacy else (beta, 1.0)
    zq = _t([[0.0, 0.0], [1.0, 1.0]])
    _assert_close(z.grad, 2 * z_weight * (_t(Z_HAND) - zq) / 4, "dloss/dz")
    expected_code_grad = _t([[-0.2, -0.4], [0.1, 0.4], [0.0, 0.0]]) * 2 * code_weight / 4
    _assert_close(codebook.grad, expected_code_grad, "dloss/dcodebook")


def test_vector_quantize_codebook_gradient_sums_over_assigned_rows():
    z = _t([[0.1], [-0.3], [2.2]], requires_grad=True)
    codebook = _t([[0.0], [2.0]], requires_grad=True)
    _, loss, indices = search.vector_quantize(z, codebook, beta=0.5, legacy=True)
    assert indices.tolist() == [0, 0, 1]
    loss.backward()
    # code 0: (0 - .1) + (0 + .3) = .2 ; code 1: 2 - 2.2 = -.2 ; times 2 * beta / 3
    _assert_close(codebook.grad, _t([[0.2], [-0.2]]) * 2 * 0.5 / 3, "dloss/dcodebook")


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_straight_through_gradient_is_identity(metric):
    z = torch.randn(7, 4, generator=_gen(9), dtype=F64, requires_grad=True)
    codebook = torch.randn(5, 4, generator=_gen(10), dtype=F64, requires_grad=True)
    upstream = torch.randn(7, 4, generator=_gen(11), dtype=F64)
    z_q, _, _ = search.vector_quantize(z, codebook, metric=metric)
    (z_q * upstream).sum().backward()
    if metric == "l2":
        _assert_close(z.grad, upstream, "d z_q / d z")
    else:  # identity onto the normalized z, then through F.normalize
        z_ref = z.detach().clone().requires_grad_(True)
        (torch.nn.functional.normalize(z_ref, dim=-1) * upstream).sum().backward()
        _assert_close(z.grad, z_ref.grad, "d z_q / d z")
    assert codebook.grad is None or not codebook.grad.any()


def test_vector_quantize_cosine_hand_case():
    z = _t([[3.0, 4.0]])
    codebook = _t([[2.0, 0.0], [0.0, 3.0]])
    z_q, loss, indices = search.vector_quantize(z, codebook, beta=0.25, metric="cosine")
    # z/|z| = [.6, .8]: code 1 (cos .8), normalized code [0, 1].
    assert indices.tolist() == [1]
    _assert_close(z_q, [[0.0, 1.0]], "normalized code")
    _assert_close(loss, 1.25 * (0.36 + 0.04) / 2, "loss on normalized vectors")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_vector_quantize_dtypes(dtype):
    z = torch.randn(9, 3, generator=_gen(12)).to(dtype)
    codebook = torch.randn(4, 3, generator=_gen(13)).to(dtype)
    z_q, loss, indices = search.vector_quantize(z, codebook)
    assert z_q.dtype == dtype and loss.dtype == torch.float32
    torch.testing.assert_close(z_q, codebook[indices])  # z + sg(zq - z): up to one rounding


def test_vector_quantize_empty_batch_has_zero_loss():
    z_q, loss, indices = search.vector_quantize(torch.empty(0, 3), torch.ones(4, 3))
    assert z_q.shape == (0, 3) and indices.shape == (0,) and loss.item() == 0.0


# ------------------------------------------------------------------------ EMA


def test_counts_and_sums_match_a_loop():
    n, k, d = 37, 5, 3
    z = torch.randn(n, d, generator=_gen(14), dtype=F64)
    indices = torch.randint(0, k - 1, (n,), generator=_gen(15))  # code k-1 stays empty
    counts, sums = ema.code_counts_and_sums(z, indices, k)
    loop_counts, loop_sums = [0.0] * k, [[0.0] * d for _ in range(k)]
    for row, code in zip(z.tolist(), indices.tolist()):
        loop_counts[code] += 1
        loop_sums[code] = [a + b for a, b in zip(loop_sums[code], row)]
    _assert_close(counts, loop_counts, "counts")
    _assert_close(sums, loop_sums, "sums")
    assert counts[-1] == 0 and counts.dtype == F64


def test_counts_and_sums_dtype_for_half_input():
    z = torch.ones(4, 2, dtype=torch.float16)
    counts, sums = ema.code_counts_and_sums(z, torch.tensor([1, 1, 0, 1]), 3)
    assert counts.dtype == sums.dtype == torch.float32
    _assert_close(counts, [1.0, 3.0, 0.0], "counts", atol=0)


def _hand_state():
    cluster_size = _t([2.0, 2.0])
    embed_sum = _t([[2.0, 4.0], [6.0, 0.0]])
    codebook = _t([[1.0, 2.0], [3.0, 0.0]])
    z = _t([[1.0, 1.0], [3.0, 3.0], [5.0, 5.0]])
    return cluster_size, embed_sum, codebook, z, torch.tensor([0, 0, 0])


def test_ema_update_by_hand():
    cluster_size, embed_sum, codebook, z, indices = _hand_state()
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, decay=0.5, eps=0.1)
    # counts [3, 0], sums [[9, 9], [0, 0]]; code 1 is unchosen and decays.
    _assert_close(cluster_size, [2.5, 1.0], "cluster_size")
    _assert_close(embed_sum, [[5.5, 6.5], [3.0, 0.0]], "embed_sum")
    # total 3.5: smoothed = (n + .1) / 3.7 * 3.5 = [9.1, 3.85] / 3.7
    expected = [[5.5 * 3.7 / 9.1, 6.5 * 3.7 / 9.1], [3.0 * 3.7 / 3.85, 0.0]]
    _assert_close(codebook, expected, "codebook")


def test_ema_state_decays_with_uneven_weights():
    cluster_size, embed_sum = _t([4.0, 10.0]), _t([[8.0], [-20.0]])
    codebook = _t([[0.0], [0.0]])
    z, indices = _t([[1.0], [3.0]]), torch.tensor([0, 0])
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, decay=0.9, eps=0.0)
    # code 0: .9 * 4 + .1 * 2 and .9 * 8 + .1 * 4; code 1 is unchosen: state * .9
    _assert_close(cluster_size, [3.8, 9.0], "cluster_size")
    _assert_close(embed_sum, [[7.6], [-18.0]], "embed_sum")
    _assert_close(codebook, [[2.0], [-2.0]], "codebook")


def test_ema_update_with_bias_correction_by_hand():
    cluster_size, embed_sum, codebook, z, indices = _hand_state()
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, 0.5, 0.1, True, step=2)
    # Stored state is not debiased.
    _assert_close(cluster_size, [2.5, 1.0], "cluster_size")
    _assert_close(embed_sum, [[5.5, 6.5], [3.0, 0.0]], "embed_sum")
    # debias 1 / (1 - .25): n = [10/3, 4/3], e = [[22/3, 26/3], [4, 0]], total 14/3
    # smoothed = (n + .1) / (14/3 + .2) * 14/3 = [721/219, 301/219]
    expected = [[22 / 3 * 219 / 721, 26 / 3 * 219 / 721], [4 * 219 / 301, 0.0]]
    _assert_close(codebook, expected, "codebook")


@pytest.mark.parametrize("bias_correction, step", [(False, None), (True, 1), (True, 7)])
def test_ema_without_smoothing_is_the_plain_ratio(bias_correction, step):
    k, d = 6, 4
    cluster_size = torch.rand(k, generator=_gen(16), dtype=F64) + 0.5
    embed_sum = torch.randn(k, d, generator=_gen(17), dtype=F64)
    codebook = torch.randn(k, d, generator=_gen(18), dtype=F64)
    z = torch.randn(20, d, generator=_gen(19), dtype=F64)
    indices = torch.randint(0, k, (20,), generator=_gen(20))
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, 0.9, 0.0, bias_correction, step)
    # With eps = 0 the debias factor cancels: codebook = embed_sum / cluster_size.
    _assert_close(codebook, embed_sum / cluster_size[:, None], "codebook", atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("step", [None, 0])
def test_ema_bias_correction_requires_step(step):
    cluster_size, embed_sum, codebook, z, indices = _hand_state()
    with pytest.raises(ValueError, match="step"):
        ema.ema_update_(
            cluster_size, embed_sum, codebook, z, indices, 0.5, bias_correction=True, step=step
        )


def test_ema_empty_batch_on_zero_state_keeps_codebook():
    codebook = torch.randn(3, 2, generator=_gen(21))
    before = codebook.clone()
    cluster_size, embed_sum = torch.zeros(3), torch.zeros(3, 2)
    empty = torch.empty(0, 2), torch.empty(0, dtype=torch.int64)
    ema.ema_update_(cluster_size, embed_sum, codebook, *empty, decay=0.99)
    assert torch.equal(codebook, before)
    assert not cluster_size.any() and not embed_sum.any()


@pytest.mark.parametrize("z_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codebook_dtype", [torch.bfloat16, torch.float32])
def test_ema_mixed_precision_matches_float64(z_dtype, codebook_dtype):
    k, d, n = 5, 3, 40
    z = torch.randn(n, d, generator=_gen(22)).to(z_dtype)
    indices = torch.randint(0, k, (n,), generator=_gen(23))
    state = [torch.rand(k, generator=_gen(24)) + 1, torch.randn(k, d, generator=_gen(25))]
    codebook = torch.zeros(k, d, dtype=codebook_dtype, requires_grad=True)
    ref = [s.double() for s in state] + [torch.zeros(k, d, dtype=F64)]
    ema.ema_update_(*state, codebook, z, indices, decay=0.8, bias_correction=True, step=3)
    ema.ema_update_(*ref, z.double(), indices, decay=0.8, bias_correction=True, step=3)
    assert codebook.dtype == codebook_dtype and state[0].dtype == torch.float32
    tol = 1e-2 if codebook_dtype == torch.bfloat16 else 1e-5
    _assert_close(codebook.detach().double(), ref[2], "codebook", atol=tol, rtol=tol)
    _assert_close(state[1].double(), ref[1], "embed_sum", atol=1e-5, rtol=1e-5)
