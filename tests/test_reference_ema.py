"""Reference EMA codebook update and its statistics vs hand-computed answers."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close
from vqkernels.reference import ema

F64 = torch.float64


def _t(rows, dtype=F64, requires_grad=False) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype, requires_grad=requires_grad)


# ------------------------------------------------------------------------ EMA


def test_counts_and_sums_match_a_loop(generator):
    n, k, d = 37, 5, 3
    z = torch.randn(n, d, generator=generator, dtype=F64)
    indices = torch.randint(0, k - 1, (n,), generator=generator)  # code k-1 stays empty
    counts, sums = ema.code_counts_and_sums(z, indices, k)
    loop_counts, loop_sums = [0.0] * k, [[0.0] * d for _ in range(k)]
    for row, code in zip(z.tolist(), indices.tolist()):
        loop_counts[code] += 1
        loop_sums[code] = [a + b for a, b in zip(loop_sums[code], row)]
    assert_close(counts, loop_counts, "counts")
    assert_close(sums, loop_sums, "sums")
    assert counts[-1] == 0 and counts.dtype == F64


def test_counts_and_sums_dtype_for_half_input():
    z = torch.ones(4, 2, dtype=torch.float16)
    counts, sums = ema.code_counts_and_sums(z, torch.tensor([1, 1, 0, 1]), 3)
    assert counts.dtype == sums.dtype == torch.float32
    assert_close(counts, [1.0, 3.0, 0.0], "counts", atol=0)


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
    assert_close(cluster_size, [2.5, 1.0], "cluster_size")
    assert_close(embed_sum, [[5.5, 6.5], [3.0, 0.0]], "embed_sum")
    # total 3.5: smoothed = (n + .1) / 3.7 * 3.5 = [9.1, 3.85] / 3.7
    expected = [[5.5 * 3.7 / 9.1, 6.5 * 3.7 / 9.1], [3.0 * 3.7 / 3.85, 0.0]]
    assert_close(codebook, expected, "codebook")


def test_ema_state_decays_with_uneven_weights():
    cluster_size, embed_sum = _t([4.0, 10.0]), _t([[8.0], [-20.0]])
    codebook = _t([[0.0], [0.0]])
    z, indices = _t([[1.0], [3.0]]), torch.tensor([0, 0])
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, decay=0.9, eps=0.0)
    # code 0: .9 * 4 + .1 * 2 and .9 * 8 + .1 * 4; code 1 is unchosen: state * .9
    assert_close(cluster_size, [3.8, 9.0], "cluster_size")
    assert_close(embed_sum, [[7.6], [-18.0]], "embed_sum")
    assert_close(codebook, [[2.0], [-2.0]], "codebook")


def test_ema_update_with_bias_correction_by_hand():
    cluster_size, embed_sum, codebook, z, indices = _hand_state()
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, 0.5, 0.1, True, step=2)
    # Stored state is not debiased.
    assert_close(cluster_size, [2.5, 1.0], "cluster_size")
    assert_close(embed_sum, [[5.5, 6.5], [3.0, 0.0]], "embed_sum")
    # debias 1 / (1 - .25): n = [10/3, 4/3], e = [[22/3, 26/3], [4, 0]], total 14/3
    # smoothed = (n + .1) / (14/3 + .2) * 14/3 = [721/219, 301/219]
    expected = [[22 / 3 * 219 / 721, 26 / 3 * 219 / 721], [4 * 219 / 301, 0.0]]
    assert_close(codebook, expected, "codebook")


@pytest.mark.parametrize("bias_correction, step", [(False, None), (True, 1), (True, 7)])
def test_ema_without_smoothing_is_the_plain_ratio(bias_correction, step, generator):
    k, d = 6, 4
    cluster_size = torch.rand(k, generator=generator, dtype=F64) + 0.5
    embed_sum = torch.randn(k, d, generator=generator, dtype=F64)
    codebook = torch.randn(k, d, generator=generator, dtype=F64)
    z = torch.randn(20, d, generator=generator, dtype=F64)
    indices = torch.randint(0, k, (20,), generator=generator)
    ema.ema_update_(cluster_size, embed_sum, codebook, z, indices, 0.9, 0.0, bias_correction, step)
    # With eps = 0 the debias factor cancels: codebook = embed_sum / cluster_size.
    assert_close(codebook, embed_sum / cluster_size[:, None], "codebook", atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("step", [None, 0])
def test_ema_bias_correction_requires_step(step):
    cluster_size, embed_sum, codebook, z, indices = _hand_state()
    with pytest.raises(ValueError, match="step"):
        ema.ema_update_(
            cluster_size, embed_sum, codebook, z, indices, 0.5, bias_correction=True, step=step
        )


def test_ema_empty_batch_on_zero_state_keeps_codebook(generator):
    codebook = torch.randn(3, 2, generator=generator)
    before = codebook.clone()
    cluster_size, embed_sum = torch.zeros(3), torch.zeros(3, 2)
    empty = torch.empty(0, 2), torch.empty(0, dtype=torch.int64)
    ema.ema_update_(cluster_size, embed_sum, codebook, *empty, decay=0.99)
    assert torch.equal(codebook, before)
    assert not cluster_size.any() and not embed_sum.any()


@pytest.mark.parametrize("z_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("codebook_dtype", [torch.bfloat16, torch.float32])
def test_ema_mixed_precision_matches_float64(z_dtype, codebook_dtype, generator):
    k, d, n = 5, 3, 40
    z = torch.randn(n, d, generator=generator).to(z_dtype)
    indices = torch.randint(0, k, (n,), generator=generator)
    state = [torch.rand(k, generator=generator) + 1, torch.randn(k, d, generator=generator)]
    codebook = torch.zeros(k, d, dtype=codebook_dtype, requires_grad=True)
    ref = [s.double() for s in state] + [torch.zeros(k, d, dtype=F64)]
    ema.ema_update_(*state, codebook, z, indices, decay=0.8, bias_correction=True, step=3)
    ema.ema_update_(*ref, z.double(), indices, decay=0.8, bias_correction=True, step=3)
    assert codebook.dtype == codebook_dtype and state[0].dtype == torch.float32
    tol = 1e-2 if codebook_dtype == torch.bfloat16 else 1e-5
    assert_close(codebook.detach().double(), ref[2], "codebook", atol=tol, rtol=tol)
    assert_close(state[1].double(), ref[1], "embed_sum", atol=1e-5, rtol=1e-5)
