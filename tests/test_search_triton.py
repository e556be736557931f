"""Triton nearest-code search (vqkernels/triton/search.py) against the reference and fp64 truth.

Each check runs twice: under the Triton interpreter on the CPU (tiny fp32
shapes; tf32 / bf16 tensor-core inputs emulated by rounding) and on a GPU
(every dtype and precision, larger shapes).
"""
import itertools
import math

import pytest
import torch
import triton

from vqkernels.reference import search as reference
from vqkernels.triton import search as triton_search

PRECISIONS = triton_search.PRECISIONS
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Allowed excess of the chosen code's true (fp64) distance over the true
# minimum, as a multiple of |z_n| * max_k |e_k|, the scale of the score's
# rounding error: about 4x the worst-case relative error of one dot product.
# fp16 / bf16 inputs multiply exactly in any mode (only fp32 accumulation).
GAP = {"ieee": 1e-5, "tf32": 4e-3, "bf16": 3e-2, "half": 1e-3}
DIST_RTOL, DIST_ATOL = 1e-5, 1e-6


def gap_tolerance(dtype, precision):
    return GAP[precision] if dtype == torch.float32 else GAP["half"]


def cases(interp, cuda):
    """(device, *case) params: tiny fp32 cases under the interpreter, the GPU's on a GPU."""
    def name(case):
        return "-".join(str(v).replace("torch.", "") for v in case)
    return ([pytest.param("cpu", *c, marks=pytest.mark.interpreter, id=f"interp-{name(c)}")
             for c in interp]
            + [pytest.param("cuda", *c, marks=pytest.mark.cuda, id=f"cuda-{name(c)}")
               for c in cuda])


def with_modes(shapes, dtypes):
    return [(dtype, precision, *shape)
            for dtype, precision, shape in itertools.product(dtypes, PRECISIONS, shapes)]


def run(z, codebook, precision, device):
    """The kernel on ``device``; outputs back on the CPU."""
    z, codebook = z.to(device).contiguous(), codebook.to(device).contiguous()
    sqnorm = codebook.float().square().sum(dim=1)
    indices, distances = triton_search.nearest_code(z, codebook, sqnorm, precision)
    assert indices.dtype == torch.int64 and distances.dtype == torch.float32
    assert indices.shape == distances.shape == (z.shape[0],)
    assert indices.device == z.device and distances.device == z.device
    return indices.cpu(), distances.cpu()


def reference_indices(z, codebook, device):
    """The reference's choice, computed on ``device`` (fast on a GPU), back on the CPU."""
    return reference.nearest_code(z.to(device), codebook.to(device))[0].cpu()


def exact_distances(z, codebook, indices):
    """fp64 |z_n - e_{indices[n]}|^2 of the inputs as given (already rounded to their dtype)."""
    return (z.double() - codebook.double()[indices]).square().sum(dim=1)


def check_distances(distances, z, codebook, indices, what):
    truth = exact_distances(z, codebook, indices)
    err = (distances.double() - truth).abs()
    bound = DIST_RTOL * truth.abs() + DIST_ATOL
    worst = int((err - bound).argmax()) if len(err) else 0
    assert bool((err <= bound).all()), (
        f"{what}: distance of row {worst} is {distances[worst].item():.9g}, fp64 truth "
        f"{truth[worst].item():.9g} (error {err[worst].item():.3e} > {bound[worst].item():.3e})")


def separated(n, k, d, dtype, generator):
    """Distinct integer codes (spacing >= 1) and z = a planted code + noise of norm <= 0.1."""
    grid = max(1, math.ceil(((4 * k) ** (1 / d) - 1) / 2)) if d < 16 else 1
    codes = torch.empty(0, d)
    while len(codes) < k:
        draw = torch.randint(-grid, grid + 1, (2 * k, d), generator=generator).float()
        codes = torch.unique(torch.cat([codes, draw]), dim=0)
    codebook = codes[torch.randperm(len(codes), generator=generator)[:k]]
    planted = torch.randint(0, k, (n,), generator=generator)
    direction = torch.randn(n, d, generator=generator)
    direction /= direction.norm(dim=1, keepdim=True).clamp_min(1e-6)
    noise = 0.1 * torch.rand(n, 1, generator=generator) * direction
    return (codebook[planted] + noise).to(dtype), codebook.to(dtype), planted


@pytest.mark.parametrize("device,dtype,precision,n,k,d", cases(
    interp=with_modes([(37, 41, 3), (41, 37, 7), (33, 70, 1), (16, 1, 5), (9, 13, 255)],
                      [torch.float32]),
    cuda=with_modes([(4099, 1031, 256), (3001, 16384, 8), (1000, 257, 1024), (1, 1, 1),
                     (2053, 4099, 3), (513, 97, 255)], DTYPES)))
def test_well_separated_exact(device, dtype, precision, n, k, d, generator):
    z, codebook, planted = separated(n, k, d, dtype, generator)
    indices, distances = run(z, codebook, precision, device)
    ref_indices = reference_indices(z, codebook, device)
    what = f"{device} {dtype} {precision} N={n} K={k} D={d}"
    assert torch.equal(ref_indices, planted), f"{what}: test data not separated"
    wrong = (indices != planted).nonzero().flatten()
    assert len(wrong) == 0, (f"{what}: {len(wrong)} rows differ from the reference, first row "
                             f"{wrong[:1].tolist()}: {indices[wrong[:1]].tolist()} != "
                             f"{planted[wrong[:1]].tolist()}")
    check_distances(distances, z, codebook, indices, what)


@pytest.mark.parametrize("device,dtype,precision,n,k,d", cases(
    interp=with_modes([(37, 41, 3), (41, 37, 8), (23, 100, 1), (8, 33, 255)], [torch.float32]),
    cuda=with_modes([(4099, 1031, 256), (2048, 16384, 8), (1000, 257, 1024), (2053, 4099, 3),
                     (513, 97, 255)], DTYPES)))
def test_random_within_tolerance(device, dtype, precision, n, k, d, generator):
    z = torch.randn(n, d, generator=generator).to(dtype)
    codebook = torch.randn(k, d, generator=generator).to(dtype)
    indices, distances = run(z, codebook, precision, device)
    z64, e64 = z.to(device, torch.float64), codebook.to(device, torch.float64)
    all_distances = (z64.square().sum(1, keepdim=True) + e64.square().sum(1)
                     - 2 * z64 @ e64.T).clamp_min(0)
    gap = (all_distances.gather(1, indices.to(device)[:, None]).squeeze(1)
           - all_distances.min(dim=1).values).cpu()
    scale = (z64.norm(dim=1) * e64.norm(dim=1).max()).cpu()
    tol = gap_tolerance(dtype, precision) * scale + 1e-9
    what = f"{device} {dtype} {precision} N={n} K={k} D={d}"
    worst = int((gap - tol).argmax())
    assert bool((gap <= tol).all()), (
        f"{what}: row {worst} chose code {indices[worst].item()} at {gap[worst].item():.3e} "
        f"above the true minimum (tolerance {tol[worst].item():.3e})")
    if dtype == torch.float32 and precision == "ieee":  # as accurate as the fp32 reference
        agree = (indices == reference_indices(z, codebook, device)).double().mean().item()
        assert agree >= 0.9, f"{what}: only {agree:.1%} of rows agree with the reference"
    check_distances(distances, z, codebook, indices, what)


@pytest.mark.parametrize("device,dtype,precision", cases(
    interp=[(torch.float32, p) for p in PRECISIONS],
    cuda=list(itertools.product(DTYPES, PRECISIONS))))
def test_ties_go_to_lowest_index(device, dtype, precision, generator):
    """Duplicate codes and half-integer z equidistant from distinct codes; all values exact."""
    k = 70 if device == "cpu" else 1500  # several K tiles either way
    codebook = torch.randint(-3, 4, (k, 2), generator=generator).float()
    z = torch.randint(-7, 8, (50, 2), generator=generator).float() / 2
    indices, distances = run(z.to(dtype), codebook.to(dtype), precision, device)
    ref_indices, ref_distances = reference.nearest_code(z, codebook)
    wrong = (indices != ref_indices).nonzero().flatten()
    assert len(wrong) == 0, (f"{device} {dtype} {precision}: {len(wrong)} tied rows, first "
                             f"{wrong[:1].tolist()}, chose {indices[wrong[:1]].tolist()} not "
                             f"{ref_indices[wrong[:1]].tolist()}")
    assert torch.equal(distances, ref_distances)

    same = codebook[:1].expand(k, 2).contiguous()
    indices, _ = run(z.to(dtype), same.to(dtype), precision, device)
    assert bool((indices == 0).all()), f"{device} {dtype} {precision}: identical codes"


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # the interpreter's nanmin
@pytest.mark.parametrize("device,dtype,precision", cases(
    interp=[(torch.float32, p) for p in PRECISIONS],
    cuda=list(itertools.product(DTYPES, PRECISIONS))))
def test_nan(device, dtype, precision, generator):
    """A row of z with a NaN gets index 0 and distance NaN; a code with a NaN never wins."""
    z, codebook, planted = separated(40, 45, 6, dtype, generator)
    z[3, 2] = float("nan")
    z[17] = float("nan")
    indices, distances = run(z, codebook, precision, device)
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
    indices, distances = run(clean, poisoned, precision, device)
    what = f"{device} {dtype} {precision}: code {poisoned_code} holds a NaN"
    assert not bool((indices == poisoned_code).any()), f"{what} and won"
    keep = clean_planted != poisoned_code
    assert torch.equal(indices[keep], clean_planted[keep]), f"{what}; other rows changed"
    assert not bool(distances.isnan().any())


@pytest.mark.parametrize("device,dtype", cases(interp=[(torch.float32,)],
                                               cuda=[(t,) for t in DTYPES]))
def test_edge_shapes(device, dtype, generator):
    empty, codebook = torch.randn(0, 5).to(dtype), torch.randn(3, 5).to(dtype)
    indices, distances = run(empty, codebook, "ieee", device)
    assert indices.shape == distances.shape == (0,)
    z = torch.randn(19, 4, generator=generator).to(dtype)
    codebook = torch.randn(1, 4, generator=generator).to(dtype)
    for precision in PRECISIONS:
        indices, distances = run(z, codebook, precision, device)
        assert bool((indices == 0).all()), f"K=1 {precision}: {indices}"
        check_distances(distances, z, codebook, indices, f"{device} {dtype} {precision} K=1")


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.interpreter),
                                    pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("family,precision", [("half", "ieee"), ("fp32", "tf32"), ("fp32", "bf16"),
                                              ("fp32_ieee", "ieee")])
def test_every_tuning_config(device, family, precision, generator):
    """Each autotuning candidate's tiles (and the BLOCK_D heuristic) give the right codes and
    (STATS) the right per-code counts and sums: on a GPU every config runs, not only the one
    autotuning picks."""
    dtype = torch.bfloat16 if family == "half" and device == "cuda" else torch.float32
    for d in (5, 40, 256):  # one D chunk, several for the small BLOCK_D_MAX, the DESIGN D
        if d == 256 and device == "cpu":
            continue  # too slow in the interpreter
        z, codebook, planted = separated(300, 77, d, dtype, generator)
        z, codebook, planted = z.to(device), codebook.to(device), planted.to(device)
        for config in triton_search._CONFIGS[family]:
            indices = torch.empty(300, dtype=torch.int64, device=device)
            distances = torch.empty(300, device=device)
            counts = torch.zeros(77, dtype=torch.int32, device=device)
            sums = torch.zeros(77, d, device=device)
            launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
            triton_search._TUNED[family].fn[lambda meta: (triton.cdiv(300, meta["BLOCK_N"]),)](
                z, codebook, codebook.float().square().sum(1), indices, distances, counts, sums,
                300, 77, D=d, PRECISION=precision, STATS=True, **config.kwargs,
                **(launch if device == "cuda" else {}))
            assert torch.equal(indices, planted), f"{family} {precision} D={d} {config}"
            check_distances(distances.cpu(), z.cpu(), codebook.cpu(), indices.cpu(),
                            f"{family} D={d} {config}")
            assert torch.equal(counts, torch.bincount(planted, minlength=77).int())
            torch.testing.assert_close(sums, torch.zeros_like(sums).index_add_(0, planted, z.float()))


@pytest.mark.cuda
def test_64bit_offsets():
    """N * D > 2^31 elements: rows at the end of z must not wrap around."""
    d, k = 1024, 16
    n = 2**31 // d + 37
    generator = torch.Generator(device="cuda").manual_seed(0)
    codebook = torch.randint(-1, 2, (k, d), generator=generator, device="cuda").to(torch.bfloat16)
    planted = torch.randint(0, k, (n,), generator=generator, device="cuda")
    z = codebook[planted]
    z[-50:] += (0.01 * torch.randn(50, d, generator=generator, device="cuda")).to(torch.bfloat16)
    indices, distances = triton_search.nearest_code(z, codebook, codebook.float().square().sum(1),
                                                    "bf16")
    for rows in (slice(0, 50), slice(n - 50, n)):
        ref_indices, ref_distances = reference.nearest_code(z[rows], codebook)
        assert torch.equal(indices[rows], ref_indices), f"rows {rows}"
        torch.testing.assert_close(distances[rows], ref_distances, rtol=DIST_RTOL, atol=DIST_ATOL)
