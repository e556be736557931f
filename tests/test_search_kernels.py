"""The nearest-code kernel of every backend (C++ CPU and CUDA, Triton) against fp64 truth
and the reference, called directly (tests/test_search.py goes through vqkernels.ops).

The contract (csrc/common/search.h, vqkernels/triton/search.py): indices = argmin_k
||z_n - e_k||^2 with ties to the lowest k; distances = the exact squared distance of
the chosen code; a NaN never compares less, so an all-NaN row gets index 0 and
distance NaN. Kernels may rank by ||e||^2 - 2 z.e, so on random data near-ties may
flip: there the chosen code must be within the backend's ranking error of the true
minimum (tests/search_tools.py). Well-separated data must give the reference's indices.
The interpreter runs tiny fp32 shapes; a GPU every dtype and precision, larger shapes.
"""
import itertools

import pytest
import torch

from helpers import backend_cases
from search_tools import (PRECISIONS, check_near_optimal, check_reference_meets_bound,
                          distance_tolerance, lattice_codes, random_problem, run_kernel,
                          separated_problem)
from vqkernels.reference import search as reference

F32, F64 = torch.float32, torch.float64
GPU_DTYPES = (F32, torch.float16, torch.bfloat16)
BACKEND_DTYPES = {"cpu": GPU_DTYPES + (F64,), "triton-interp": (F32,), "cuda": GPU_DTYPES,
                  "triton-cuda": GPU_DTYPES}
# (N, K, D): odd sizes, primes, both CPU paths (D <= 16 direct, larger D GEMM).
CPP_RANDOM_SHAPES = [(1, 1, 1), (0, 5, 8), (7, 1, 3), (97, 3, 1), (997, 1009, 1), (997, 1009, 3),
                     (1009, 997, 7), (513, 257, 16), (257, 130, 17), (64, 1009, 33),
                     (131, 67, 255), (67, 131, 257), (29, 31, 1024), (2000, 600, 64)]
CPP_SEPARATED_SHAPES = [(997, 1009, 3), (1009, 63, 1), (300, 997, 8), (257, 64, 16),
                        (129, 1009, 17), (100, 300, 255), (64, 100, 257), (33, 65, 1024),
                        (5, 1, 7)]
PRECISION_SHAPE = (300, 257, 64)  # the C++ kernels in every precision mode


def grid(dtypes, precisions, shapes):
    """(dtype, precision, N, K, D) for every combination."""
    return [(dtype, precision, *shape)
            for dtype, precision, shape in itertools.product(dtypes, precisions, shapes)]


def per_backend(make_cases):
    """(backend, device, *case) for every kernel backend, its cases ``make_cases(its dtypes)``."""
    return backend_cases({name: make_cases(dtypes) for name, dtypes in BACKEND_DTYPES.items()})


# (dtype, precision, N, K, D) per backend: the C++ kernels in "ieee" (and every mode at one
# shape), Triton in every mode; the interpreter tiny fp32 shapes, a GPU larger ones.
RANDOM = {
    "cpu": (grid(BACKEND_DTYPES["cpu"], ["ieee"], CPP_RANDOM_SHAPES)
            + grid([F32], PRECISIONS, [PRECISION_SHAPE])),
    "cuda": (grid(GPU_DTYPES, ["ieee"], CPP_RANDOM_SHAPES)
             + grid([F32], PRECISIONS, [PRECISION_SHAPE])),
    "triton-interp": grid([F32], PRECISIONS,
                          [(37, 41, 3), (41, 37, 8), (23, 100, 1), (8, 33, 255)]),
    "triton-cuda": grid(GPU_DTYPES, PRECISIONS,
                        [(4099, 1031, 256), (2048, 16384, 8), (1000, 257, 1024), (2053, 4099, 3),
                         (513, 97, 255)]),
}
SEPARATED = {
    "cpu": grid(BACKEND_DTYPES["cpu"], ["ieee"], CPP_SEPARATED_SHAPES),
    "cuda": grid(GPU_DTYPES, ["ieee"], CPP_SEPARATED_SHAPES),
    "triton-interp": grid([F32], PRECISIONS,
                          [(37, 41, 3), (41, 37, 7), (33, 60, 1), (16, 1, 5), (9, 13, 255)]),
    "triton-cuda": grid(GPU_DTYPES, PRECISIONS,
                        [(4099, 1031, 256), (3001, 16384, 8), (1, 1, 1), (1000, 257, 1024),
                         (2053, 4099, 3), (513, 97, 255)]),
}


def describe(backend, device, dtype, precision, shape=""):
    return f"{backend} on {device} {dtype} {precision} {shape}".rstrip()


@pytest.mark.parametrize("backend,device,dtype,precision,n,k,d", backend_cases(RANDOM))
def test_random_data_near_optimal(backend, device, dtype, precision, n, k, d, generator):
    """Random data: the chosen code within the backend's ranking error of the true minimum,
    its distance exact to the backend's rounding; fp32 "ieee" mostly agrees with the reference."""
    z, e = random_problem(n, k, d, dtype, generator)
    indices, distances = run_kernel(backend, z.to(device), e.to(device), precision)
    what = describe(backend, device, dtype, precision, f"N={n} K={k} D={d}")
    check_near_optimal(backend, z, e, indices, distances, what, precision)
    if n:
        check_reference_meets_bound(backend, z, e, precision)
    if n and dtype == F32 and precision == "ieee":
        ref_indices = reference.nearest_code(z.to(device), e.to(device))[0].cpu()
        agree = (indices.cpu() == ref_indices).double().mean().item()
        assert agree >= 0.9, f"{what}: only {agree:.1%} of rows agree with the reference"


@pytest.mark.parametrize("backend,device,dtype,precision,n,k,d", backend_cases(SEPARATED))
def test_separated_data_exact_indices(backend, device, dtype, precision, n, k, d, generator):
    """Well-separated data: exactly the reference's (the planted) codes, and its distances."""
    z, e, own = separated_problem(n, k, d, dtype, generator)
    indices, distances = run_kernel(backend, z.to(device), e.to(device), precision)
    ref_indices, ref_distances = (x.cpu() for x in reference.nearest_code(z.to(device),
                                                                           e.to(device)))
    assert torch.equal(ref_indices, own), "test data is not separated"
    what = describe(backend, device, dtype, precision, f"N={n} K={k} D={d}")
    mismatch = (indices.cpu() != ref_indices).nonzero().flatten()
    assert mismatch.numel() == 0, (f"{what}: {mismatch.numel()} rows differ from the reference, "
                                   f"first row {mismatch[:1].tolist()}")
    check_near_optimal(backend, z, e, indices, distances, what, precision)
    rtol, _ = distance_tolerance(backend, dtype, d)
    torch.testing.assert_close(distances.cpu(), ref_distances.to(distances.dtype), rtol=2 * rtol,
                               atol=1e-6 if dtype != F64 else 1e-12)


@pytest.mark.parametrize("backend,device,dtype,d", per_backend(
    lambda dtypes: list(itertools.product(dtypes, (2, 8, 64)))))
def test_duplicate_codes_go_to_the_lowest_index(backend, device, dtype, d, generator):
    """Copies of a code in its own SIMD lane, in others and across code tiles: the first wins."""
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
    indices, distances = run_kernel(backend, z.to(device), e.to(device))
    expected = torch.tensor([7, 7, 7, 7, 7, 1200, 1200, 3, 3])
    what = describe(backend, device, dtype, f"D={d}")
    assert torch.equal(indices.cpu(), expected), f"{what}: {indices.tolist()}"
    assert torch.equal(distances.cpu()[:7], torch.zeros(7, dtype=distances.dtype)), what
    assert torch.equal(distances.cpu()[7:], torch.ones(2, dtype=distances.dtype)), what


@pytest.mark.parametrize("backend,device,dtype,precision", per_backend(
    lambda dtypes: list(itertools.product(dtypes, PRECISIONS))))
def test_equidistant_codes_go_to_the_lowest_index(backend, device, dtype, precision, generator):
    """Duplicate codes and half-integer z equidistant from distinct codes; all values exact."""
    k = 70 if backend == "triton" and device == "cpu" else 1500  # several K tiles either way
    codebook = torch.randint(-3, 4, (k, 2), generator=generator).to(dtype)
    z = (torch.randint(-7, 8, (50, 2), generator=generator).double() / 2).to(dtype)
    indices, distances = run_kernel(backend, z.to(device), codebook.to(device), precision)
    ref_indices, ref_distances = reference.nearest_code(z, codebook)
    what = describe(backend, device, dtype, precision)
    wrong = (indices.cpu() != ref_indices).nonzero().flatten()
    assert len(wrong) == 0, (f"{what}: {len(wrong)} tied rows, first {wrong[:1].tolist()}, chose "
                             f"{indices[wrong[:1]].tolist()} not {ref_indices[wrong[:1]].tolist()}")
    assert torch.equal(distances.cpu(), ref_distances.to(distances.dtype)), what

    same = codebook[:1].expand(k, 2).contiguous()
    indices, _ = run_kernel(backend, z.to(device), same.to(device), precision)
    assert bool((indices == 0).all()), f"{what}: identical codes"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's nanmin
@pytest.mark.parametrize("backend,device,dtype,d", per_backend(
    lambda dtypes: [(t, d) for t in (F32, F64, torch.bfloat16) if t in dtypes for d in (3, 64)]))
def test_nan_and_inf_rows(backend, device, dtype, d, generator):
    """A NaN row gets index 0 and distance NaN, an inf row index 0 and distance inf; a
    code holding a NaN is never chosen, even by a row sitting on the next code."""
    z, e = random_problem(6, 300, d, dtype, generator)
    z[1, 0] = float("nan")       # every distance NaN: index 0, distance NaN
    z[3] = float("nan")
    z[4, d - 1] = float("inf")   # every distance inf: index 0, distance inf
    e[5] = float("nan")          # a NaN code is never chosen ...
    z[5] = e[6]                  # ... and row 5 sits on code 6
    indices, distances = run_kernel(backend, z.to(device), e.to(device))
    indices, distances = indices.cpu(), distances.cpu()
    assert indices[[1, 3, 4]].tolist() == [0, 0, 0], indices.tolist()
    assert distances[[1, 3]].isnan().all() and distances[4] == float("inf")
    assert indices[5] == 6 and distances[5] == 0
    finite = [0, 2]
    check_near_optimal(backend, z[finite], e, indices[finite], distances[finite],
                       describe(backend, device, dtype, "finite rows"))


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's nanmin
@pytest.mark.parametrize("backend,device,dtype,precision", per_backend(
    lambda dtypes: list(itertools.product(dtypes, PRECISIONS))))
def test_nan_rows_and_a_nan_code(backend, device, dtype, precision, generator):
    """On separated data: NaN rows get index 0 and distance NaN, the other rows their own
    code; a code holding a NaN never wins, and no other row changes."""
    z, codebook, planted = separated_problem(40, 45, 6, dtype, generator)
    z[3, 2] = float("nan")
    z[17] = float("nan")
    indices, distances = (x.cpu() for x in run_kernel(backend, z.to(device), codebook.to(device),
                                                      precision))
    nan_rows = torch.tensor([3, 17])
    assert indices[nan_rows].tolist() == [0, 0], f"NaN rows got indices {indices[nan_rows]}"
    assert bool(distances[nan_rows].isnan().all()), f"NaN rows got {distances[nan_rows]}"
    ok = torch.ones(40, dtype=torch.bool)
    ok[nan_rows] = False
    assert torch.equal(indices[ok], planted[ok])

    clean, clean_planted = z[ok], planted[ok]
    poisoned_code = clean_planted[0].item()
    poisoned = codebook.clone()
    poisoned[poisoned_code, 1] = float("nan")
    indices, distances = (x.cpu() for x in run_kernel(backend, clean.to(device),
                                                      poisoned.to(device), precision))
    what = f"{describe(backend, device, dtype, precision)}: code {poisoned_code} holds a NaN"
    assert not bool((indices == poisoned_code).any()), f"{what} and won"
    keep = clean_planted != poisoned_code
    assert torch.equal(indices[keep], clean_planted[keep]), f"{what}; other rows changed"
    assert not bool(distances.isnan().any())


@pytest.mark.parametrize("backend,device,dtype", per_backend(
    lambda dtypes: [(dtype,) for dtype in dtypes]))
def test_empty_batch_and_single_code(backend, device, dtype, generator):
    """N = 0 gives empty outputs; K = 1 gives index 0 and its distance in every precision."""
    empty, codebook = torch.randn(0, 5).to(dtype), torch.randn(3, 5).to(dtype)
    indices, distances = run_kernel(backend, empty.to(device), codebook.to(device))
    assert indices.shape == distances.shape == (0,)
    z = torch.randn(19, 4, generator=generator).to(dtype)
    codebook = torch.randn(1, 4, generator=generator).to(dtype)
    for precision in PRECISIONS:
        indices, distances = run_kernel(backend, z.to(device), codebook.to(device), precision)
        what = describe(backend, device, dtype, precision, "K=1")
        assert bool((indices == 0).all()), f"{what}: {indices}"
        check_near_optimal(backend, z, codebook, indices, distances, what, precision)
