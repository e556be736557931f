"""Nearest-code test data, the raw kernel of each backend and its tolerances, for
tests/test_search_kernels.py, tests/test_search_kernel_limits.py and tests/test_search.py.

How far a near-tie may flip depends on how a backend ranks the codes: the C++
kernels (CPU blocked / BLAS, CUDA SIMT) rank in fp32 (fp64 for fp64 input) in
every precision mode; Triton rounds the products to tf32 or bf16 under those
modes (fp16 / bf16 inputs multiply exactly, with fp32 accumulation).
"""
import torch

from vqkernels.ops import search as ops_search
from vqkernels.reference import search as reference

F64 = torch.float64
PRECISIONS = ("ieee", "tf32", "bf16")
# Unit roundoff of the arithmetic the C++ kernels rank and sum in (fp16 / bf16 are
# converted to fp32 exactly, so their bound is fp32's).
EPS = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -24,
       torch.bfloat16: 2.0 ** -24}
# Triton: allowed excess of the chosen code's true (fp64) distance over the true
# minimum, as a multiple of |z_n| * max_k |e_k|, the scale of the score's rounding
# error: about 4x the worst-case relative error of one dot product.
TRITON_GAP = {"ieee": 1e-5, "tf32": 4e-3, "bf16": 3e-2, "half": 1e-3}
TRITON_DIST_RTOL, TRITON_DIST_ATOL = 1e-5, 1e-6


def run_kernel(backend, z, codebook, precision="ieee"):
    """The backend's own kernel (no ops-layer validation or NaN fix-up), its outputs'
    dtypes, shapes and device checked; outputs on z's device."""
    sqnorm = codebook.float().square().sum(1)
    kernel = ops_search.DISPATCH.backends[backend].run
    indices, distances = kernel(z.contiguous(), codebook.contiguous(), sqnorm, precision)
    check_output_types(z, indices, distances)
    return indices, distances


def distance_dtype(dtype):
    return F64 if dtype == F64 else torch.float32


# --- data ----------------------------------------------------------------------------------

def random_problem(n, k, d, dtype, generator):
    z = torch.randn(n, d, generator=generator, dtype=F64).to(dtype)
    e = torch.randn(k, d, generator=generator, dtype=F64).to(dtype)
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
    return torch.tensor(list(codes), dtype=F64)


def separated_problem(n, k, d, dtype, generator):
    """Codes on distinct lattice points, z = code + noise in [-1/4, 1/4]^D; returns (z, e, own).

    Another code differs from z's own code by >= 1 in some coordinate, which adds
    >= (3/4)^2 - (1/4)^2 = 1/2 to the squared distance: far above any ranking error.
    Coordinates stay within 31.25, where bfloat16 still resolves 1/8, so rounding z
    to bf16 (as the input dtype or the "bf16" precision) keeps every row separated.
    """
    e = lattice_codes(k, d, generator)
    own = torch.randint(0, k, (n,), generator=generator)
    noise = (torch.rand(n, d, generator=generator, dtype=F64) - 0.5) / 2
    return (e[own] + noise).to(dtype), e.to(dtype), own


# --- checks --------------------------------------------------------------------------------

def true_distances(z, codebook):
    """(N, K) float64 squared distances; the expansion's error is ~1e-16 relative here."""
    z, e = z.double().cpu(), codebook.double().cpu()
    return (z.square().sum(1, keepdim=True) - 2 * z @ e.T + e.square().sum(1)).clamp_min(0)


def exact_distance(z, codebook, indices):
    z, e = z.double().cpu(), codebook.double().cpu()
    return (z - e[indices.cpu()]).square().sum(1)


def ranking_tolerance(backend, z, codebook, precision):
    """Per row: how far above the true minimum the chosen code's distance may be."""
    n, d = z.shape
    z_norm = z.double().cpu().norm(dim=1)
    e_norm = codebook.double().cpu().norm(dim=1)
    e_max = e_norm[e_norm.isfinite()].max()
    if backend == "triton":
        gap = TRITON_GAP[precision] if z.dtype == torch.float32 else TRITON_GAP["half"]
        return gap * z_norm * e_max + 1e-9
    # Worst-case bound of an fp ranking score ||e||^2 - 2 z.e (gamma_D), both sides,
    # plus the error of the float64 expansion that gives the true minimum.
    return (2 * (d + 2) * EPS[z.dtype] * (e_max ** 2 + 2 * z_norm * e_max)
            + 4 * (d + 2) * 2.0 ** -53 * (z_norm + e_max) ** 2 + 1e-30)


def distance_tolerance(backend, dtype, d):
    """(rtol, atol) of a returned distance against the exact distance of its code."""
    if backend == "triton":
        return TRITON_DIST_RTOL, TRITON_DIST_ATOL
    return (d + 2) * EPS[dtype], 1e-30


def check_output_types(z, indices, distances):
    n = z.shape[0]
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert distances.dtype == distance_dtype(z.dtype) and distances.shape == (n,)
    assert indices.device == z.device and distances.device == z.device


def check_near_optimal(backend, z, codebook, indices, distances, what, precision="ieee"):
    """Chosen code within the backend's ranking error of the true minimum (a NaN code
    never wins); its distance within the backend's rounding of the exact distance."""
    n, d = z.shape
    if n == 0:
        return
    indices, distances = indices.cpu(), distances.cpu()
    assert int(indices.min()) >= 0 and int(indices.max()) < codebook.shape[0], what
    chosen = exact_distance(z, codebook, indices)
    best = true_distances(z, codebook).nan_to_num(nan=float("inf")).min(1).values
    regret = chosen - best
    tolerance = ranking_tolerance(backend, z, codebook, precision)
    bad = regret > tolerance
    assert not bad.any(), (f"{what}: {int(bad.sum())} rows chose a code farther than the minimum "
                           f"by up to {float(regret.max()):.3e} "
                           f"(tolerance {float(tolerance.max()):.3e})")
    rtol, atol = distance_tolerance(backend, z.dtype, d)
    err = (distances.double() - chosen).abs()
    dist_tol = rtol * chosen + atol
    assert (err <= dist_tol).all(), (f"{what}: distances off the exact distance of the chosen "
                                     f"code by up to {float(err.max()):.3e} "
                                     f"(tolerance {float(dist_tol.max()):.3e})")


def check_reference_meets_bound(backend, z, codebook, precision):
    """The reference held to the backend's bound: a sanity check of the bound itself."""
    indices, _ = reference.nearest_code(z, codebook)
    distances = exact_distance(z, codebook, indices).to(distance_dtype(z.dtype))
    check_near_optimal(backend, z, codebook, indices, distances, "reference", precision)
