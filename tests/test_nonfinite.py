"""NaN and Inf inputs: every backend that runs here returns what docs/NUMERICS.md's table says."""
import os

import pytest
import torch

from vqkernels import _ext, ops
from vqkernels.reference import ddim as ref_ddim

NAN, INF = float("nan"), float("inf")
BACKENDS = ["reference"] + (["cpu"] if _ext._C is not None else []) + [
    pytest.param("triton", marks=pytest.mark.interpreter)]
CODES = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
TABLE = ref_ddim.alphas_cumprod(ref_ddim.betas_for_schedule())
# D = 2 as written; D = 40 pads with zero columns, which change no distance: the C++ GEMM
# path, and its bf16 screen where the processor has one.
DIMS = [2, 40]


def widen(x, dim):
    return torch.nn.functional.pad(x, (0, dim - x.shape[-1]))


def same_nan(got, want):
    """Equal where ``want`` is finite or inf, NaN exactly where ``want`` is NaN."""
    torch.testing.assert_close(got, want, equal_nan=True, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_code_rows_without_finite_distance_get_code_0(backend, dim):
    z = torch.tensor([[NAN, 0.0], [0.9, 1.1], [INF, 0.0], [-INF, 0.0], [INF, INF], [2.1, 2.0]])
    indices, distances = ops.nearest_code(widen(z, dim), widen(CODES, dim), backend=backend)
    assert indices.tolist() == [0, 1, 0, 0, 0, 2]
    assert distances[0].isnan() and not distances[2:5].isfinite().any()
    assert distances[[1, 5]].isfinite().all()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nearest_code_never_picks_a_nan_code(backend, dim):
    codes = widen(torch.tensor([[NAN, 0.0], [1.0, 1.0], [INF, 2.0], [2.0, 2.0]]), dim)
    z = widen(torch.tensor([[0.9, 1.1], [2.1, 2.0], [0.0, 0.0]]), dim)
    indices, distances = ops.nearest_code(z, codes, backend=backend)
    assert indices.tolist() == [1, 3, 1] and distances.isfinite().all()
    all_nan = torch.full((3, dim), NAN)
    indices, distances = ops.nearest_code(z, all_nan, backend=backend)
    assert indices.tolist() == [0, 0, 0] and distances.isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cosine_search_of_non_finite_rows(backend):
    z = torch.tensor([[NAN, 1.0], [INF, 0.0], [1.0, 0.1]])
    indices, distances = ops.nearest_code(z, CODES + 0.5, metric="cosine", backend=backend)
    assert indices[:2].tolist() == [0, 0] and distances[:2].isnan().all()
    assert distances[2].isfinite()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_search_of_non_finite_rows(backend, dim):
    books = [widen(CODES, dim), widen(CODES[[2, 0, 1]] / 4, dim)]
    z = widen(torch.tensor([[NAN, 0.0], [1.2, 0.7], [INF, 0.0], [2.1, 2.0]]), dim)
    indices, quantized = ops.residual_nearest_code(z, books, backend=backend)
    finite = ops.residual_nearest_code(z[[1, 3]], books, backend=backend)
    assert indices[[0, 2]].eq(0).all()
    assert torch.equal(quantized[[0, 2]], (books[0][0] + books[1][0]).expand(2, dim))
    assert torch.equal(indices[[1, 3]], finite[0]) and torch.equal(quantized[[1, 3]], finite[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_residual_statistics_of_non_finite_rows(backend, deterministic):
    books = [CODES, CODES[[2, 0, 1]] / 4]
    z = torch.tensor([[NAN, 0.0], [1.2, 0.7], [INF, 0.0], [2.1, 2.0]])
    indices, quantized, counts, sums = ops.residual_nearest_code_with_stats(
        z, books, deterministic=deterministic, backend=backend)
    finite = ops.residual_nearest_code_with_stats(z[[1, 3]], books, backend=backend)
    assert torch.equal(indices, ops.residual_nearest_code(z, books, backend=backend)[0])
    for q in range(2):
        assert torch.equal(counts[q], finite[2][q] + torch.tensor([2.0, 0.0, 0.0]))
        assert sums[q][0, 0].isnan() and sums[q][0, 1].isfinite()  # NaN + inf: NaN
        torch.testing.assert_close(sums[q][1:], finite[3][q][1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_vector_quantize_propagates_nan(backend):
    z = torch.tensor([[NAN, 0.0], [0.9, 1.1]])
    z_q, loss, indices = ops.vector_quantize(z, CODES, backend=backend)
    assert indices.tolist() == [0, 1] and loss.isnan()
    same_nan(z_q, torch.tensor([[NAN, 0.0], [1.0, 1.0]]))  # z + sg(zq - z) per element


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_statistics_of_non_finite_rows(backend, bad):
    z = torch.tensor([[bad, 0.0], [0.9, 1.1], [2.1, 2.0]])
    counts, sums = ops.code_counts_and_sums(z, torch.tensor([0, 1, 2]), 3, backend=backend)
    assert counts.tolist() == [1, 1, 1]
    same_nan(sums, z)
    indices, _, counts, sums = ops.nearest_code_with_stats(z, CODES, deterministic=True,
                                                           backend=backend)
    assert indices.tolist() == [0, 1, 2] and counts.tolist() == [1, 1, 1]
    same_nan(sums, z)


@pytest.mark.interpreter
def test_fused_triton_statistics_of_an_inf_row():
    z = torch.tensor([[INF, 0.0], [0.9, 1.1], [2.1, 2.0]])
    indices, _, counts, sums = ops.nearest_code_with_stats(z, CODES, backend="triton")
    assert indices.tolist() == [0, 1, 2] and counts.tolist() == [1, 1, 1]
    same_nan(sums, z)


def ema_state():
    return torch.ones(3), torch.zeros(3, 2), torch.zeros(3, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF], ids=["nan", "inf"])
def test_ema_update_with_a_non_finite_row(backend, bad):
    z = torch.tensor([[bad, 0.0], [1.0, 1.0]])
    cluster_size, embed_sum, codebook = ema_state()
    ops.ema_update_(cluster_size, embed_sum, codebook, z, torch.tensor([0, 1]), decay=0.9,
                    backend=backend)
    same_nan(cluster_size, torch.tensor([1.0, 1.0, 0.9]))
    same_nan(embed_sum, torch.tensor([[bad, 0.0], [0.1, 0.1], [0.0, 0.0]]))
    same_nan(codebook[0], torch.tensor([bad, 0.0]))
    assert codebook[1:].isfinite().all() and (codebook[1] > 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update_with_nan_counts_keeps_the_codebook(backend):
    cluster_size, embed_sum, codebook = ema_state()
    codebook += 3.0
    sums = torch.ones(3, 2)
    ops.ema_update_(cluster_size, embed_sum, codebook, stats=(torch.tensor([NAN, 1.0, 0.0]), sums),
                    decay=0.9, backend=backend)
    assert cluster_size[0].isnan() and cluster_size[1:].tolist() == pytest.approx([1.0, 0.9])
    same_nan(embed_sum, torch.full((3, 2), 0.1))
    assert torch.equal(codebook, torch.full((3, 2), 3.0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_update_stages_keeps_a_nan_in_its_stage(backend):
    states = [list(ema_state()) for _ in range(3)]
    expected = [[t.clone() for t in state] for state in states]
    stats = [(torch.tensor([1.0, 2.0, 0.0]), torch.ones(3, 2)) for _ in range(3)]
    stats[1] = (torch.tensor([NAN, 1.0, 0.0]), torch.ones(3, 2))
    ops.ema_update_stages_(*(list(column) for column in zip(*states)), stats, decay=0.9,
                           backend=backend)
    for state, stage_stats in zip(expected, stats):
        ops.ema_update_(*state, stats=stage_stats, decay=0.9, backend=backend)
    assert states[1][0][0].isnan() and not states[0][0].isnan().any()
    for got, want in zip(states, expected):
        for a, b in zip(got, want):
            same_nan(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_nan_row_poisons_one_center(backend):
    z = torch.tensor([[NAN, 0.0], [0.9, 1.1], [2.1, 2.0], [0.1, 0.0], [1.0, 0.9]])
    centers, counts = ops.kmeans(z, 2, 3, generator=torch.Generator().manual_seed(0),
                                 backend=backend)
    assert centers.isnan().any() and counts.sum() == 5  # propagated, not dropped


def test_replace_dead_codes_nan_cluster_size_is_alive():
    codebook, cluster_size, embed_sum = torch.zeros(3, 2), torch.tensor([NAN, 0.0, 5.0]), \
        torch.zeros(3, 2)
    z = torch.tensor([[INF, 1.0], [2.0, 2.0], [3.0, 3.0]])
    restarted = ops.replace_dead_codes_(codebook, cluster_size, embed_sum, z, 1.0,
                                        generator=torch.Generator().manual_seed(0))
    assert restarted.tolist() == [False, True, False]
    assert cluster_size[0].isnan() and bool((codebook[1] != 0).all())


def attention_rows(backend, q, k, v):
    return ops.attention(q[None, None], k[None, None], v[None, None], backend=backend)[0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_propagates_nan(backend):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, generator=gen) for _ in range(3))
    q_nan = q.clone()
    q_nan[0, 1] = NAN
    out = attention_rows(backend, q_nan, k, v)
    assert out[0].isnan().all() and out[1:].isfinite().all()
    k_nan = k.clone()
    k_nan[2, 0] = NAN
    assert attention_rows(backend, q, k_nan, v).isnan().all()
    v_nan = v.clone()
    v_nan[1, 3] = NAN
    out = attention_rows(backend, q, k, v_nan)
    assert out[:, 3].isnan().all() and out[:, :3].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_infinite_logits(backend):
    k = torch.tensor([[INF, 0.0], [0.0, 1.0], [0.0, -1.0]])
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    q = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [-1.0, 1.0]])
    out = attention_rows(backend, q, k, v)
    assert out[0].isnan().all()  # logit +inf: inf - inf
    same_nan(out[1], v[1:].mean(0))  # key 0 at -inf gets weight 0
    assert out[2].isfinite().all()
    all_neg = attention_rows(backend, q[1:2], torch.full((3, 2), INF), v)
    assert all_neg.isnan().all()  # every logit -inf: 0 / 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_timestep_embedding_of_non_finite_t(backend):
    t = torch.tensor([NAN, INF, -INF, 5.0])
    out = ops.timestep_embedding(t, 5, backend=backend)
    assert out[:3, :4].isnan().all() and (out[:, 4] == 0).all() and out[3].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_adaln_non_finite_rows_and_columns(backend, bad):
    x, y = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    gate, shift, scale = torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 6)
    y[1, 2, 4] = bad
    x_new, h = ops.gated_residual_layer_norm_modulate(x, gate, y, shift, scale, backend=backend)
    nonfinite = torch.zeros(2, 3, 6, dtype=torch.bool)
    nonfinite[1, 2, 4] = True
    assert torch.equal(~x_new.isfinite(), nonfinite)
    assert torch.equal(h.isnan(), nonfinite.any(-1, keepdim=True).expand(2, 3, 6))
    assert torch.equal(~ops.gated_residual(x, gate, y, backend=backend).isfinite(), nonfinite)
    shift[0, 1] = NAN
    h = ops.layer_norm_modulate(x, shift, scale, backend=backend)
    assert h[0, :, 1].isnan().all() and h.isnan().sum() == 3


def step(backend, model_output, sample, **kw):
    return ops.ddim_step(model_output, 500, sample, TABLE, num_inference_steps=10,
                         backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_step_non_finite_elements(backend):
    bad = torch.tensor([[NAN, INF, -INF, 0.5]])
    ones = torch.ones(1, 4)
    prev, x0 = step(backend, bad, ones)
    assert prev[0, :3].isnan().all() and prev[0, 3].isfinite()
    assert x0[0, 0].isnan() and x0[0, 1:].tolist()[:2] == [-INF, INF]
    prev, x0 = step(backend, bad, ones, clip_sample=True)
    assert x0[0, 0].isnan() and x0[0, 1:3].tolist() == [-1.0, 1.0]
    assert prev[0, 0].isnan() and prev[0, 1:3].tolist() == [INF, -INF]
    prev, x0 = step(backend, ones, bad, clip_sample=True)
    assert prev[0, 0].isnan() and x0[0, 0].isnan() and prev[0, 1:].isfinite().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ddim_thresholding_nan_poisons_its_sample(backend):
    model_output = torch.tensor([[NAN, 0.5, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4]])
    prev, x0 = step(backend, model_output, torch.ones(2, 4), thresholding=True)
    assert prev[0].isnan().all() and x0[0].isnan().all()
    assert prev[1].isfinite().all() and x0[1].isfinite().all()


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's x^3
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("backend", BACKENDS)
def test_gelu_tanh_of_non_finite_inputs_is_pytorchs(backend):
    x = torch.tensor([NAN, INF, -INF, 1e30, -1e30, -200.0, 0.0, -0.0])
    got = ops.gelu_tanh(x, backend=backend)
    torch.testing.assert_close(got, torch.tensor([NAN, INF, NAN, 1e30, -0.0, -0.0, 0.0, -0.0]),
                               equal_nan=True, atol=0, rtol=0)
    want = torch.nn.functional.gelu(x.double(), approximate="tanh").float()
    torch.testing.assert_close(got, want, equal_nan=True, atol=0, rtol=0)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter's exp
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_group_norm_non_finite_poisons_its_group(backend, bad):
    x = torch.randn(2, 4, 3, 3)
    x[1, 2, 1, 1] = bad  # sample 1, group 1 of 2
    y = ops.group_norm(x, 2, silu=True, backend=backend)
    assert y[1, 2:].isnan().all()
    assert y[0].isfinite().all() and y[1, :2].isfinite().all()


def test_table_lists_every_op():
    text = open(os.path.join(os.path.dirname(__file__), "..", "docs", "NUMERICS.md")).read()
    for op in ops.__all__:
        assert f"`{op}" in text, op
