"""ops.residual_nearest_code on every backend against the reference, and its argument checks."""
import textwrap
from pathlib import Path

import pytest
import torch

from helpers import kernel_backends, run_python
from vqkernels import ops
from vqkernels.ops import residual
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
    (torch.zeros(4, 5), [torch.zeros(3, 5), torch.zeros(0, 5)], r"codebooks\[1\] must have at"),
    (torch.zeros(4, 5, dtype=torch.int64), [torch.zeros(3, 5)], "z must be float32"),
])
def test_bad_arguments_name_themselves(z, codebooks, match):
    with pytest.raises(ValueError, match=match):
        ops.residual_nearest_code(z, codebooks)


@pytest.mark.parametrize("option, match", [(dict(metric="dot"), "metric must be"),
                                           (dict(precision="fp8"), "precision must be")])
def test_bad_options_name_themselves(option, match):
    with pytest.raises(ValueError, match=match):
        ops.residual_nearest_code(torch.zeros(4, 5), [torch.zeros(3, 5)], **option)


# --- the fused C++ CPU kernel ---------------------------------------------------------------

needs_cpu_kernels = pytest.mark.skipif(
    not hasattr(torch.ops.vqkernels, "residual_nearest_code"), reason="needs the C++ extension")


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n, d, sizes", [
    (2100, 5, (700, 3, 64)),   # direct path: 3 row blocks, K over two staged tiles
    (530, 40, (1100, 1, 9)),   # GEMM path: K over three GEMM tiles
])
def test_fused_kernel_is_the_stage_loop_bit_for_bit(dtype, n, d, sizes, generator):
    """One process, one machine: the fused pass and Q nearest_code calls on the C++ backend
    run the same arithmetic, stage for stage."""
    z, books = random_problem(generator, n=n, d=d, sizes=sizes, dtype=dtype)
    z[3] = float("nan")
    books[2][0] = float("inf")  # a code no finite row may take
    precision = "ieee" if dtype in (torch.float32, torch.float64) else "bf16"
    fused = ops.residual_nearest_code(z, books, backend="cpu")
    loop = residual.stage_by_stage("cpu")(z, books, precision)
    assert torch.equal(fused[0], loop[0])
    torch.testing.assert_close(fused[1], loop[1], rtol=0, atol=0, equal_nan=True)
    assert (fused[0][3] == 0).all() and (fused[0][:, 2] != 0).sum() == n - 1


@needs_cpu_kernels
def test_fused_kernel_opcheck(generator):
    z, books = random_problem(generator)
    sqnorms = [book.square().sum(1) for book in books]
    torch.library.opcheck(torch.ops.vqkernels.residual_nearest_code.default,
                          (z, books, sqnorms, "ieee"))


@needs_cpu_kernels
def test_fused_kernel_rejects_mismatched_norms():
    z, book = torch.zeros(4, 5), torch.zeros(3, 5)
    with pytest.raises(RuntimeError, match="codebook_sqnorms must have one"):
        torch.ops.vqkernels.residual_nearest_code(z, [book, book], [torch.zeros(3)], "ieee")
    with pytest.raises(RuntimeError, match="at least one codebook"):
        torch.ops.vqkernels.residual_nearest_code(z, [], [], "ieee")


def test_compiles_fullgraph(generator):
    torch._dynamo.reset()
    z, books = random_problem(generator, sizes=(6, 6))
    stacked = torch.stack(books)
    compiled = torch.compile(lambda z, books: ops.residual_nearest_code(z, books), fullgraph=True)
    got, expected = compiled(z, stacked), ops.residual_nearest_code(z, stacked)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@needs_cpu_kernels
def test_fused_kernel_memory_is_not_n_by_k():
    """Q=4, N=65536, K=4096, D=8: one stage's N x K fp32 would be 1 GiB; allow < 64 MiB."""
    out = run_python("-c", textwrap.dedent("""
        import resource, torch, vqkernels
        from vqkernels import ops
        g = torch.Generator().manual_seed(0)
        z, books = torch.randn(65536, 8, generator=g), torch.randn(4, 4096, 8, generator=g)
        ops.residual_nearest_code(z[:4], books[:, :4], backend="cpu")  # library, thread pool
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        indices, quantized = ops.residual_nearest_code(z, books, backend="cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert indices.shape == (65536, 4) and quantized.isfinite().all()
        print((after - before) / 1024)
    """))
    assert out.returncode == 0, out.stdout + out.stderr
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.1f} MiB"


# --- the fused Triton kernel ----------------------------------------------------------------

TRITON_DEVICES = [pytest.param("cpu", id="interp", marks=pytest.mark.interpreter),
                  pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_fused_triton_kernel_is_the_stage_loop(device, precision, generator):
    """Several programs, K over several tiles, D padded to its power of two, a NaN row and
    an inf code: the fused kernel takes each stage's nearest_code decision."""
    z, books = separated_problem(generator, torch.float32, n=50, d=5)
    books[0] = torch.cat([books[0], books[0] + 1000.0])  # 10 codes, the copies never win
    books.append(torch.randn(70, 5, generator=generator, dtype=torch.float64).float() / 10)
    z[7] = float("nan")
    books[2][0] = float("inf")
    z, books = z.to(device), [book.to(device) for book in books]
    fused = ops.residual_nearest_code(z, books, precision=precision, backend="triton")
    loop = residual.stage_by_stage("triton")(z, books, precision)
    assert torch.equal(fused[0], loop[0])
    torch.testing.assert_close(fused[1], loop[1], equal_nan=True)
    assert (fused[0][7] == 0).all()  # its quantized row is the sum of the codes 0: inf here


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_triton_beyond_the_fused_width_runs_stage_by_stage(device, generator):
    z, books = separated_problem(generator, torch.float32, n=6, d=4)
    z = torch.cat([z, torch.zeros(6, 296, dtype=z.dtype)], 1)  # D = 300 > MAX_DIM
    books = [torch.cat([book, torch.zeros(book.shape[0], 296, dtype=book.dtype)], 1)
             for book in books]
    got = ops.residual_nearest_code(z.to(device), [b.to(device) for b in books], backend="triton")
    expected = reference.residual_nearest_code(z, books)
    assert torch.equal(got[0].cpu(), expected[0])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("op", ["residual_nearest_code_triton",
                                "residual_nearest_code_with_stats_triton"])
def test_fused_triton_kernel_opcheck(device, op, generator):
    z, books = random_problem(generator, n=20)
    z, books = z.to(device), [book.to(device) for book in books]
    torch.library.opcheck(getattr(torch.ops.vqkernels, op).default,
                          (z, books, [book.square().sum(1) for book in books], "ieee"))


def test_the_cuda_limits_are_the_kernels():
    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "kernels.h").read_text()
    assert f"kMaxResidualStages = {residual.CUDA_MAX_STAGES};" in header
    assert f"kResidualMaxDim = {residual.CUDA_MAX_DIM};" in header


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d", [3, 8, 40, 64])
def test_fused_cuda_kernel_is_the_stage_loop_bit_for_bit(dtype, d, generator):
    """Both rank by the exact fp32 distance of the fp32 residual, in increasing d."""
    z, books = random_problem(generator, n=1000, d=d, sizes=(70, 1, 33, 300), dtype=dtype)
    z[5] = float("nan")
    books[2][0] = float("inf")
    z, books = z.cuda(), [book.cuda() for book in books]
    fused = ops.residual_nearest_code(z, books, backend="cuda")
    loop = residual.stage_by_stage("cuda")(z, books, residual.default_precision(dtype))
    assert torch.equal(fused[0], loop[0])
    torch.testing.assert_close(fused[1], loop[1], rtol=0, atol=0, equal_nan=True)
    assert (fused[0][5] == 0).all()


@pytest.mark.cuda
def test_cuda_beyond_the_fused_width_runs_stage_by_stage(generator):
    z, books = separated_problem(generator, torch.float32, n=300, d=4)
    pad = lambda t: torch.cat([t, torch.zeros(t.shape[0], 61, dtype=t.dtype)], 1)  # D = 65
    got = ops.residual_nearest_code(pad(z).cuda(), [pad(b).cuda() for b in books], backend="cuda")
    assert torch.equal(got[0].cpu(), reference.residual_nearest_code(z, books)[0])


# --- the EMA statistics of every stage ------------------------------------------------------

def stage_statistics(z, books, indices):
    """Counts and sums of the float64 residual each stage searched, by bincount / index_add."""
    residual, counts, sums = z.double(), [], []
    for book, ind in zip(books, indices.cpu().unbind(1)):
        counts.append(torch.bincount(ind, minlength=book.shape[0]).double())
        sums.append(torch.zeros(book.shape, dtype=torch.float64).index_add_(0, ind, residual))
        residual = residual - book.double()[ind]
    return counts, sums


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64],
                         ids=["float32", "bfloat16", "float64"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_with_stats_sums_the_residual_each_stage_searched(backend, device, dtype, deterministic,
                                                          generator):
    """The search is residual_nearest_code's; stage q's statistics are over r_q (Triton:
    added by the fused kernel, several programs and K tiles; else one pass a stage)."""
    if dtype == torch.float64 and backend not in ("cpu", "reference"):
        pytest.skip("float64 runs on the CPU backends only")
    z, books = separated_problem(generator, dtype, n=50)
    books.append(torch.randn(70, 4, generator=generator, dtype=torch.float64).to(dtype) / 10)
    z, books = z.to(device), [book.to(device) for book in books]
    precision = "bf16" if dtype == torch.bfloat16 else "ieee"
    indices, quantized, counts, sums = ops.residual_nearest_code_with_stats(
        z, books, precision=precision, deterministic=deterministic, backend=backend)
    expected = ops.residual_nearest_code(z, books, precision=precision, backend=backend)
    assert torch.equal(indices, expected[0]) and torch.equal(quantized, expected[1])
    want_counts, want_sums = stage_statistics(z.cpu(), [b.cpu() for b in books], indices)
    assert [c.dtype for c in counts + sums] == [torch.float32] * 2 * len(books)
    for q in range(len(books)):
        assert torch.equal(counts[q].cpu().double(), want_counts[q]), f"stage {q} counts"
        torch.testing.assert_close(sums[q].cpu().double(), want_sums[q], rtol=1e-5, atol=1e-4)


def test_with_stats_checks_its_arguments(generator):
    z, books = random_problem(generator)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        ops.residual_nearest_code_with_stats(z, books, deterministic=1)
    with pytest.raises(ValueError, match=r"codebooks\[1\] must be"):
        ops.residual_nearest_code_with_stats(z, [books[0], books[1][:, :2]])
    empty = ops.residual_nearest_code_with_stats(z[:0], books)
    assert empty[0].shape == (0, 3) and [c.sum().item() for c in empty[2]] == [0, 0, 0]


def test_with_stats_compiles_fullgraph(generator):
    torch._dynamo.reset()
    z, books = random_problem(generator, sizes=(6, 6))

    def step(z, books):
        return ops.residual_nearest_code_with_stats(z, books)

    got, expected = torch.compile(step, fullgraph=True)(z, books), step(z, books)
    assert torch.equal(got[0], expected[0])
    for a, b in zip(got[2] + got[3], expected[2] + expected[3]):
        torch.testing.assert_close(a, b)
