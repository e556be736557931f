"""Nearest-code search and vector quantization through vqkernels.ops, every backend."""
import pytest
import torch

import vqkernels
from vqkernels import ops
from helpers import backend_cases, kernel_backends
from search_tools import separated_problem
from vqkernels.reference import search as reference
from vqkernels.testing import assert_code_stats, assert_nearest

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REFERENCE = pytest.param("reference", "cpu", id="reference")
# The dtypes each backend runs here: the interpreter tests run fp32.
DTYPE_CASES = {"reference": [(t,) for t in DTYPES], "cpu": [(t,) for t in DTYPES],
               "triton-interp": [(torch.float32,)], "cuda": [(t,) for t in DTYPES],
               "triton-cuda": [(t,) for t in DTYPES]}
KERNEL_DTYPES = backend_cases(DTYPE_CASES)  # (backend, device, dtype)
BACKEND_DTYPES = backend_cases(DTYPE_CASES, [REFERENCE] + kernel_backends())


@pytest.mark.parametrize("backend,device,dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("n,k,d", [(0, 5, 3), (1, 1, 1), (37, 41, 3), (64, 17, 7), (29, 1, 16),
                                   (13, 200, 255)])
def test_nearest_code_exact_on_separated_data(backend, device, dtype, n, k, d, generator):
    """Well-separated data (distinct lattice codes, exact in every dtype): the planted codes."""
    z, codebook, truth = separated_problem(n, k, d, dtype, generator)
    indices, distances = ops.nearest_code(z.to(device), codebook.to(device), backend=backend)
    assert torch.equal(indices.cpu(), truth)
    assert_nearest(z, codebook, indices, distances, ops.search.default_precision(dtype),
                   what=f"{backend} {dtype}")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("n,k,d", [(53, 97, 8), (31, 64, 33)])
def test_nearest_code_random_data(backend, device, precision, n, k, d, generator):
    z, codebook = torch.randn(n, d, generator=generator), torch.randn(k, d, generator=generator)
    indices, distances = ops.nearest_code(z.to(device), codebook.to(device), precision=precision,
                                          backend=backend)
    assert_nearest(z, codebook, indices, distances, precision, what=f"{backend} {precision}")


@pytest.mark.parametrize("backend,device,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("n,k,d", [(0, 5, 3), (1, 1, 1), (97, 13, 7), (64, 3, 33), (50, 300, 5)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_nearest_code_with_stats(backend, device, dtype, n, k, d, deterministic, generator):
    """The search of nearest_code and the statistics of code_counts_and_sums of its indices.

    On a GPU each shape is a new autotuning key: the fused Triton kernel runs once per
    config first, and the statistics must still count every row once."""
    z, codebook = torch.randn(n, d, generator=generator), torch.randn(k, d, generator=generator)
    z, codebook = z.to(dtype), codebook.to(dtype)
    indices, distances, counts, sums = ops.nearest_code_with_stats(
        z.to(device), codebook.to(device), deterministic=deterministic, backend=backend)
    assert_nearest(z, codebook, indices, distances, ops.search.default_precision(dtype),
                   what=f"{backend} {dtype}")
    assert_code_stats(z, indices, k, counts, sums, what=f"{backend} {dtype}")


def test_nearest_code_with_stats_is_l2_only_and_validates(generator):
    z, codebook = torch.randn(4, 3, generator=generator), torch.randn(5, 3, generator=generator)
    with pytest.raises(ValueError, match="codebook"):
        ops.nearest_code_with_stats(z, codebook[:, :2])
    with pytest.raises(TypeError, match="metric"):
        ops.nearest_code_with_stats(z, codebook, metric="cosine")


@pytest.mark.interpreter
def test_nearest_code_with_stats_triton_opcheck(generator):
    z, codebook = torch.randn(23, 5, generator=generator), torch.randn(7, 5, generator=generator)
    sqnorm = codebook.square().sum(1)
    torch.library.opcheck(torch.ops.vqkernels.nearest_code_with_stats_triton.default,
                          (z, codebook, sqnorm, "ieee"))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_nearest_code_ties_go_to_the_lowest_index(backend, device, generator):
    codebook = torch.randn(6, 4, generator=generator)
    codebook[4] = codebook[1]  # duplicate: index 1 must win
    z = codebook[[4, 1, 1]] + 0.0
    indices, _ = ops.nearest_code(z.to(device), codebook.to(device), backend=backend)
    assert indices.tolist() == [1, 1, 1]


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_nearest_code_nan_row(backend, device, generator):
    z, codebook = torch.randn(3, 5, generator=generator), torch.randn(7, 5, generator=generator)
    z[1, 2] = float("nan")
    indices, distances = ops.nearest_code(z.to(device), codebook.to(device), backend=backend)
    assert indices[1].item() == 0 and torch.isnan(distances[1])
    ref_indices, _ = reference.nearest_code(z[[0, 2]], codebook)
    assert indices.cpu()[[0, 2]].tolist() == ref_indices.tolist()


@pytest.mark.parametrize("backend", ["reference", pytest.param("cpu")])
def test_nearest_code_cosine(backend, generator):
    z, codebook = torch.randn(40, 6, generator=generator), torch.randn(23, 6, generator=generator)
    z[3] = 0  # a zero row: 1 - cos = 1 for every code
    indices, distances = ops.nearest_code(z, codebook, metric="cosine", backend=backend)
    ref_indices, ref_distances = reference.nearest_code(z, codebook, metric="cosine")
    assert torch.equal(indices, ref_indices)
    torch.testing.assert_close(distances, ref_distances, rtol=0, atol=1e-6)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.nearest_code(torch.ones(3), torch.ones(2, 3)), ValueError, "z must be 2-D"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(2, 3)), ValueError, "same D"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(0, 2)), ValueError, "at least one code"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(2, 2).half()), TypeError, "same dtype"),
    (lambda: ops.nearest_code(torch.ones(3, 2, dtype=torch.int64), torch.ones(2, 2)), TypeError, "z must"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(2, 2), metric="dot"), ValueError, "metric"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(2, 2), precision="fp8"), ValueError, "precision"),
    (lambda: ops.nearest_code(torch.ones(3, 2), torch.ones(2, 2), backend="cuda"),
     vqkernels.BackendUnavailableError, "needs a CUDA tensor"),
    (lambda: ops.vector_quantize(torch.ones(3, 2), torch.ones(2, 2), beta="x"), TypeError, "beta"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- vector_quantize -------------------------------------------------------------------------

def vq_case(generator, n=45, k=19, d=6, dtype=torch.float32):
    z = torch.randn(n, d, generator=generator).to(dtype).requires_grad_()
    codebook = torch.randn(k, d, generator=generator).to(dtype).requires_grad_()
    return z, codebook


def vq_grads(fn, z, codebook, generator):
    z_q, loss, indices = fn(z, codebook)
    upstream = torch.randn(z_q.shape, generator=generator, dtype=torch.float64).to(z_q.dtype)
    grad_z, grad_e = torch.autograd.grad((z_q * upstream).sum() + 3.0 * loss, (z, codebook))
    return z_q, loss, indices, grad_z, grad_e


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_vector_quantize_matches_reference(backend, legacy, metric, generator):
    z, codebook = vq_case(generator)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    fast = vq_grads(lambda a, b: ops.vector_quantize(a, b, beta=0.3, legacy=legacy, metric=metric,
                                                     backend=backend),
                    z, codebook, torch.Generator().manual_seed(seed))
    ref = vq_grads(lambda a, b: reference.vector_quantize(a, b, 0.3, legacy, metric),
                   z, codebook, torch.Generator().manual_seed(seed))
    assert torch.equal(fast[2], ref[2])
    for name, a, b in zip(("z_q", "loss", "grad z", "grad codebook"),
                          (fast[0], fast[1], fast[3], fast[4]), (ref[0], ref[1], ref[3], ref[4])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_vector_quantize_deterministic_codebook_gradient_is_bitwise(generator):
    z, codebook = vq_case(generator, n=2000, k=7, d=5)
    grads = [torch.autograd.grad(ops.vector_quantize(z, codebook, deterministic=True)[1], codebook)[0]
             for _ in range(2)]
    assert torch.equal(grads[0], grads[1])
    fast = torch.autograd.grad(ops.vector_quantize(z, codebook, deterministic=False)[1], codebook)[0]
    torch.testing.assert_close(grads[0], fast)


def test_vector_quantize_opcheck(generator):
    z, codebook = vq_case(generator)
    torch.library.opcheck(torch.ops.vqkernels.vector_quantize.default,
                          (z, codebook, 0.25, True, "ieee", "auto", False))


def test_vector_quantizer_compiles_fullgraph(generator):
    torch._dynamo.reset()
    vq = vqkernels.VectorQuantizer(23, 4)
    z = torch.randn(2, 4, 3, 5, generator=generator)
    compiled = torch.compile(vq, fullgraph=True)
    got, expected = compiled(z), vq(z)
    torch.testing.assert_close(got[0], expected[0])
    assert torch.equal(got[2][2], expected[2][2])
