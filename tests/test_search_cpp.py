"""torch.ops.vqkernels.nearest_code (C++ CPU and CUDA kernels) against the reference.

The contract (csrc/common/search.h): indices = argmin_k ||z_n - e_k||^2 with ties to
the lowest k; distances = the exact squared distance of the chosen code; a NaN never
compares less, so an all-NaN row gets index 0 and distance NaN. The kernels may rank
by ||e||^2 - 2 z.e (the CPU kernel does; the CUDA SIMT kernel ranks by the exact
distance), so on random data near-ties may flip: there the chosen code's true distance
must be within the ranking's error bound of the true minimum. Well-separated data must
give the reference's indices.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vqkernels  # noqa: F401  (loads the extension, registers the ops)
from vqkernels.reference import search as reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Unit roundoff of the arithmetic the kernels rank and sum in (fp16 / bf16 are
# converted to fp32 exactly, so their bound is fp32's).
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24,
       torch.bfloat16: 2.0 ** -24}
# (N, K, D): odd sizes, primes, both CPU paths (D <= 16 direct, larger D GEMM).
SHAPES = [(1, 1, 1), (0, 5, 8), (7, 1, 3), (97, 3, 1), (997, 1009, 1), (997, 1009, 3),
          (1009, 997, 7), (513, 257, 16), (257, 130, 17), (64, 1009, 33), (131, 67, 255),
          (67, 131, 257), (29, 31, 1024), (2000, 600, 64)]
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)]
ISAS = ["avx2", "default"]  # ATEN_CPU_CAPABILITY values; the default run covers avx512 here


def nearest_code(z, codebook, precision="ieee"):
    sqnorm = codebook.float().square().sum(1)
    return torch.ops.vqkernels.nearest_code(z, codebook, sqnorm, precision)


def supported(device, dtype):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 is CPU-only (tested to raise in test_cuda_rejects_float64)")


def true_distances(z, codebook):
    """(N, K) float64 squared distances; the expansion's error is ~1e-16 relative here."""
    z, e = z.double().cpu(), codebook.double().cpu()
    return (z.square().sum(1, keepdim=True) - 2 * z @ e.T + e.square().sum(1)).clamp_min(0)


def exact_distance(z, codebook, indices):
    z, e = z.double().cpu(), codebook.double().cpu()
    return (z - e[indices.cpu()]).square().sum(1)


def check_near_optimal(z, codebook, indices, distances, what):
    """Chosen code within the ranking error of the true minimum; distance exact to ~D eps."""
    n, d = z.shape
    dtype = z.dtype
    assert indices.dtype == torch.int64 and indices.shape == (n,), what
    expected_out = torch.float64 if dtype == torch.float64 else torch.float32
    assert distances.dtype == expected_out and distances.shape == (n,), what
    if n == 0:
        return
    indices, distances = indices.cpu(), distances.cpu()
    assert int(indices.min()) >= 0 and int(indices.max()) < codebook.shape[0], what
    chosen = exact_distance(z, codebook, indices)
    best = true_distances(z, codebook).nan_to_num(nan=float("inf")).min(1).values  # NaN codes lose
    z_norm = z.double().cpu().norm(dim=1)
    e_norm = codebook.double().cpu().norm(dim=1)
    e_max = e_norm[e_norm.isfinite()].max()
    # Worst-case bound of an fp ranking score ||e||^2 - 2 z.e (gamma_D), both sides,
    # plus the error of the float64 expansion that gives the true minimum.
    rank_tol = (2 * (d + 2) * EPS[dtype] * (e_max ** 2 + 2 * z_norm * e_max)
                + 4 * (d + 2) * 2.0 ** -53 * (z_norm + e_max) ** 2 + 1e-30)
    regret = chosen - best
    bad = regret > rank_tol
    assert not bad.any(), (f"{what}: {int(bad.sum())} rows chose a code farther than the minimum "
                           f"by up to {float(regret.max()):.3e} "
                           f"(tolerance {float(rank_tol.max()):.3e})")
    dist_tol = (d + 2) * EPS[dtype] * chosen + 1e-30
    err = (distances.double() - chosen).abs()
    assert (err <= dist_tol).all(), (f"{what}: distances off the exact distance of the chosen "
                                     f"code by up to {float(err.max()):.3e} "
                                     f"(tolerance {float(dist_tol.max()):.3e})")


def random_problem(n, k, d, dtype, generator):
    z = torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype)
    e = torch.randn(k, d, generator=generator, dtype=torch.float64).to(dtype)
    return z, e


def lattice_codes(k, d, generator):
    """K distinct random integer points in [-31, 31]^D (float64), exact in every dtype."""
    radius = 1
    while (2 * radius + 1) ** d < 2 * k and radius < 31:
        radius += 1
    side = 2 * radius + 1
    assert side ** d >= k, "lattice too small for K distinct codes"
    if side ** d <= 1 << 24:
        flat = torch.randperm(side ** d, generator=generator)[:k]
        return torch.stack([(flat // side ** i) % side for i in range(d)], dim=1).double() - radius
    codes = set()
    while len(codes) < k:
        codes.add(tuple(torch.randint(-radius, radius + 1, (d,), generator=generator).tolist()))
    return torch.tensor(list(codes), dtype=torch.float64)


def separated_problem(n, k, d, dtype, generator):
    """Codes on distinct lattice points, z = code + noise in [-1/4, 1/4]^D.

    Another code differs from z's own code by >= 1 in some coordinate, which adds
    >= (3/4)^2 - (1/4)^2 = 1/2 to the squared distance: far above any ranking error.
    Coordinates stay within 31.25, where bfloat16 still resolves 1/8.
    """
    e = lattice_codes(k, d, generator)
    own = torch.randint(0, k, (n,), generator=generator)
    noise = (torch.rand(n, d, generator=generator, dtype=torch.float64) - 0.5) / 2
    return (e[own] + noise).to(dtype), e.to(dtype), own


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", SHAPES)
def test_random_near_optimal(device, dtype, n, k, d, generator):
    supported(device, dtype)
    z, e = random_problem(n, k, d, dtype, generator)
    indices, distances = nearest_code(z.to(device), e.to(device))
    assert indices.device.type == device and distances.device.type == device
    check_near_optimal(z, e, indices, distances, f"{device} {dtype} N={n} K={k} D={d}")
    ref_indices, _ = reference.nearest_code(z, e)
    if n:  # the reference is held to the same bound: a sanity check of the bound itself
        check_near_optimal(z, e, ref_indices, exact_distance(z, e, ref_indices).to(
            torch.float64 if dtype == torch.float64 else torch.float32), "reference")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,k,d", [(997, 1009, 3), (1009, 63, 1), (300, 997, 8), (257, 64, 16),
                                   (129, 1009, 17), (100, 300, 255), (64, 100, 257),
                                   (33, 65, 1024), (5, 1, 7)])
def test_separated_exact_indices(device, dtype, n, k, d, generator):
    supported(device, dtype)
    z, e, own = separated_problem(n, k, d, dtype, generator)
    indices, distances = nearest_code(z.to(device), e.to(device))
    ref_indices, ref_distances = reference.nearest_code(z, e)
    assert torch.equal(ref_indices, own), "test data is not separated"
    mismatch = (indices.cpu() != ref_indices).nonzero().flatten()
    assert mismatch.numel() == 0, (f"{device} {dtype} N={n} K={k} D={d}: {mismatch.numel()} rows "
                                   f"differ from the reference, first row {mismatch[:1].tolist()}")
    check_near_optimal(z, e, indices, distances, f"{device} {dtype} separated")
    torch.testing.assert_close(distances.cpu(), ref_distances, rtol=(d + 2) * EPS[dtype] * 2,
                               atol=1e-6 if dtype != torch.float64 else 1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", [2, 8, 64])
def test_ties_go_to_lowest_index(device, dtype, d, generator):
    supported(device, dtype)
    k = 1500  # spans several register blocks and SIMD lanes, and code tiles of the GEMM path
    e = lattice_codes(k, d, generator) + 64  # distinct, exact, all far from 0
    # Copies of code 7 in its own SIMD lane (23, 71, 1031) and in others; of 1200 likewise.
    copies = {7: [23, 40, 71, 700, 1031, 1499], 1200: [1201, 1216]}
    for src, dups in copies.items():
        e[dups] = e[src].clone()
    e = e.to(dtype)
    z = torch.cat([e[[7, 23, 71, 1031, 1499, 1200, 1216]], torch.zeros(2, d, dtype=dtype)])
    # Codes equidistant from z = 0: +x at 3, -x at 19 (same lane) and 4: 3 wins.
    e[[3, 4, 19]] = 0
    e[3, 0], e[4, 0], e[19, 0] = 1, -1, -1
    indices, distances = nearest_code(z.to(device), e.to(device))
    expected = torch.tensor([7, 7, 7, 7, 7, 1200, 1200, 3, 3])
    assert torch.equal(indices.cpu(), expected), f"{device} {dtype} D={d}: {indices.tolist()}"
    assert torch.equal(distances.cpu()[:7], torch.zeros(7, dtype=distances.dtype))
    assert torch.equal(distances.cpu()[7:], torch.ones(2, dtype=distances.dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [3, 64])
def test_nan_and_inf_rows(device, dtype, d, generator):
    supported(device, dtype)
    z, e = random_problem(6, 300, d, dtype, generator)
    z[1, 0] = float("nan")       # every distance NaN: index 0, distance NaN
    z[3] = float("nan")
    z[4, d - 1] = float("inf")   # every distance inf: index 0, distance inf
    e[5] = float("nan")          # a NaN code is never chosen ...
    z[5] = e[6]                  # ... and row 5 sits on code 6
    indices, distances = nearest_code(z.to(device), e.to(device))
    indices, distances = indices.cpu(), distances.cpu()
    assert indices[[1, 3, 4]].tolist() == [0, 0, 0], indices.tolist()
    assert distances[[1, 3]].isnan().all() and distances[4] == float("inf")
    assert indices[5] == 6 and distances[5] == 0
    finite = [0, 2]
    check_near_optimal(z[finite], e, indices[finite], distances[finite], f"{device} finite rows")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_precision_modes(device, precision, generator):
    z, e = random_problem(300, 257, 64, torch.float32, generator)
    indices, distances = nearest_code(z.to(device), e.to(device), precision)
    check_near_optimal(z, e, indices, distances, f"{device} precision={precision}")


def test_bad_arguments_raise():
    z, e = torch.randn(4, 8), torch.randn(5, 8)
    with pytest.raises(RuntimeError, match="precision"):
        nearest_code(z, e, "fp8")
    with pytest.raises(RuntimeError, match="same D"):
        nearest_code(z, torch.randn(5, 7))
    with pytest.raises(RuntimeError, match="same dtype"):
        nearest_code(z, e.double())
    with pytest.raises(RuntimeError, match="codebook_sqnorm"):
        torch.ops.vqkernels.nearest_code(z, e, torch.ones(4), "ieee")


def test_schema():
    z, e = torch.randn(4, 8), torch.randn(5, 8)
    torch.library.opcheck(torch.ops.vqkernels.nearest_code.default,
                          (z, e, e.square().sum(1), "ieee"), test_utils=("test_schema",))


@pytest.mark.cuda
def test_cuda_rejects_float64():
    z, e = torch.randn(4, 8, device="cuda", dtype=torch.float64), torch.randn(5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="float32, float16 or bfloat16"):
        nearest_code(z, e.double())


@pytest.mark.cuda
def test_cuda_many_rows_and_splits(generator):
    """Many row blocks and several code splits merged by the atomic keys."""
    z, e = random_problem(70000, 4099, 8, torch.float16, generator)
    indices, distances = nearest_code(z.cuda(), e.cuda())
    sample = torch.randperm(z.shape[0], generator=generator)[:2000]
    check_near_optimal(z[sample], e, indices.cpu()[sample], distances.cpu()[sample],
                       "cuda many rows")


@pytest.mark.cuda
def test_cuda_64bit_offsets():
    """N * D > 2^31 elements (4 GiB of fp16): the last rows must still be right."""
    d, k = 8, 5
    n = (1 << 31) // d + 4099
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, device="cuda", dtype=torch.float16, generator=g)
    e = torch.randn(k, d, device="cuda", dtype=torch.float16, generator=g)
    indices, distances = nearest_code(z, e)
    tail = slice(n - 8192, n)
    ref_indices, ref_distances = nearest_code(z[tail].cpu(), e.cpu())
    check_near_optimal(z[tail].cpu(), e.cpu(), indices[tail].cpu(), distances[tail].cpu(),
                       "cuda rows past 2^31 elements")
    assert (indices[tail].cpu() == ref_indices).float().mean() > 0.99


def run_python(code, env=None, timeout=600):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("isa", ISAS)
def test_other_cpu_isas(isa):
    """The AVX2 and baseline builds of the SIMD loops (picked via ATEN_CPU_CAPABILITY)."""
    code = f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import test_search_cpp as t
        assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"), \\
            torch.backends.cpu.get_cpu_capability()
        g = torch.Generator().manual_seed(1234)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for n, k, d in [(97, 3, 1), (257, 130, 17), (513, 257, 16), (131, 67, 255)]:
                z, e = t.random_problem(n, k, d, dtype, g)
                what = f"{isa} {{dtype}} {{n}} {{k}} {{d}}"
                t.check_near_optimal(z, e, *t.nearest_code(z, e), what)
                z, e, own = t.separated_problem(n, k, d, dtype, g)
                assert torch.equal(t.nearest_code(z, e)[0], own)
        print("ok")
    """
    out = run_python(code, env={"ATEN_CPU_CAPABILITY": isa})
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


def test_memory_is_not_n_by_k():
    """N=65536, K=16384, D=8: an N x K fp32 matrix would be 4 GiB; allow < 64 MiB growth."""
    code = """
        import resource, torch, vqkernels
        op = torch.ops.vqkernels.nearest_code
        g = torch.Generator().manual_seed(0)
        z, e = torch.randn(65536, 8, generator=g), torch.randn(16384, 8, generator=g)
        sq = e.square().sum(1)
        op(z[:4], e[:4], sq[:4], "ieee")  # one-time library and thread-pool setup
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        indices, distances = op(z, e, sq, "ieee")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert indices.shape == (65536,) and distances.isfinite().all()
        print((after - before) / 1024)
    """
    out = run_python(code)
    assert out.returncode == 0, out.stdout + out.stderr
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.1f} MiB"
