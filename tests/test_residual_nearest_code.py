"""ops.residual_nearest_code on every backend against the reference, and its argument checks."""
import pytest
import torch

from helpers import kernel_backends
from vqkernels import ops
from vqkernels.reference import search as reference

BACKENDS = [pytest.param("reference", "cpu", id="reference"), *kernel_backends()]


def random_problem(generator, n=37, d=5, sizes=(7, 1, 12), dtype=torch.float32):
    z = torch.randn(n, d, generator=generator, dtype=torch.float64)
    books = [torch.randn(k, d, generator=generator, dtype=torch.float64) / (q + 1)
             for q, k in enumerate(sizes)]
    return z.to(dtype), [book.to(dtype) for book in books]


def separated_problem(generator, dtype, n=41, d=4):
    """Stage q's codes on a lattice of spacing ``scales[q]``, z a sum of one code per stage
    plus noise far under the finest spacing: every stage has one clear winner. bfloat16
    holds about 3 digits, so it gets two stages 8x apart."""
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    sizes, scales, span = ((5, 6), (8.0, 1.0), 2) if sixteen_bit else ((5, 6, 3), (100, 10, 1), 4)
    books = [torch.randint(-span, span + 1, (k, d), generator=generator).double() * scale
             for k, scale in zip(sizes, scales)]
    picks = [torch.randint(0, k, (n,), generator=generator) for k in sizes]
    z = sum(book[pick] for book, pick in zip(books, picks))
    z = z + 0.01 * torch.randn(n, d, generator=generator, dtype=torch.float64)
    return z.to(dtype), [book.to(dtype) for book in books]


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_stage_takes_a_nearest_code_of_its_residual(backend, device, dtype, generator):
    if dtype == torch.float64 and backend != "cpu" and backend != "reference":
        pytest.skip("float64 runs on the CPU backends only")
    z, books = random_problem(generator, dtype=dtype)
    indices, quantized = ops.residual_nearest_code(
        z.to(device), [b.to(device) for b in books], precision="ieee", backend=backend)
    assert indices.shape == (37, 3) and indices.dtype == torch.int64
    assert quantized.dtype == dtype
    indices, quantized = indices.cpu(), quantized.cpu()
    residual, total = z.double(), torch.zeros_like(z, dtype=torch.float64)
    for q, book in enumerate(books):
        book = book.double()
        dist = torch.cdist(residual, book).square()
        chosen = dist.gather(1, indices[:, q:q + 1])[:, 0]
        slack = 1e-5 * (residual.square().sum(1) + book.square().sum(1).max())
        assert (chosen <= dist.min(1).values + slack).all(), f"stage {q} is not the nearest"
        residual, total = residual - book[indices[:, q]], total + book[indices[:, q]]
    torch.testing.assert_close(quantized.double(), total, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_reference_on_separated_data(backend, device, dtype, generator):
    if dtype == torch.bfloat16 and backend == "triton" and device == "cpu":
        pytest.skip("the interpreter runs float32 only")
    z, books = separated_problem(generator, dtype)
    expected = reference.residual_nearest_code(z, books)
    got = ops.residual_nearest_code(z.to(device), [b.to(device) for b in books], backend=backend)
    assert torch.equal(got[0].cpu(), expected[0])
    torch.testing.assert_close(got[1].cpu(), expected[1])


def test_a_stacked_codebook_tensor_is_the_list_of_its_rows(generator):
    z, books = random_problem(generator, sizes=(6, 6, 6, 6))
    stacked = ops.residual_nearest_code(z, torch.stack(books))
    listed = ops.residual_nearest_code(z, books)
    assert torch.equal(stacked[0], listed[0]) and torch.equal(stacked[1], listed[1])


def test_codebooks_of_different_sizes_and_no_rows(generator):
    z, books = random_problem(generator, n=0)
    indices, quantized = ops.residual_nearest_code(z, books)
    assert indices.shape == (0, 3) and quantized.shape == (0, 5)


@pytest.mark.parametrize("z, codebooks, match", [
    (torch.zeros(5), [torch.zeros(3, 5)], "z must be a 2-D"),
    (torch.zeros(4, 5), torch.zeros(3, 5), r"\(Q, K, D\)"),
    (torch.zeros(4, 5), [], "at least one codebook"),
    (torch.zeros(4, 5), [torch.zeros(3, 5), torch.zeros(3, 6)],
     r"codebooks\[1\] must be a \(K, D=5\)"),
    (torch.zeros(4, 5), [torch.zeros(3, 5, dtype=torch.float64)],
     r"codebooks\[0\] must have z's dtype"),
])
def test_bad_arguments_name_themselves(z, codebooks, match):
    with pytest.raises(ValueError, match=match):
        ops.residual_nearest_code(z, codebooks)
