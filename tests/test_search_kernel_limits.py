"""The nearest-code kernels where one backend has its own limits and paths: argument
checks and schema of the C++ op, float64 on CUDA, many rows and 64-bit offsets on a
GPU, the CPU's other SIMD builds, bounded CPU memory, and every Triton autotuning
config (tests/test_search_kernels.py holds every backend to the shared contract).
"""
import os
import textwrap

import pytest
import torch
import triton

from helpers import run_python
from search_tools import (TRITON_DIST_ATOL, TRITON_DIST_RTOL, check_near_optimal, random_problem,
                          run_kernel, separated_problem)
from vqkernels.reference import search as reference
from vqkernels.triton import search as triton_search

ISAS = ["avx2", "default"]  # ATEN_CPU_CAPABILITY values; the default run covers avx512 here


def nearest_code(z, codebook, precision="ieee"):
    """The C++ op (CPU or CUDA by the tensors' device)."""
    return run_kernel("cpu", z, codebook, precision)


def test_bad_arguments_raise():
    """The C++ op checks its own arguments and names the one at fault."""
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
    check_near_optimal("cuda", z[sample], e, indices.cpu()[sample], distances.cpu()[sample],
                       "cuda many rows")


@pytest.mark.cuda
def test_cuda_64bit_offsets():
    """CUDA kernel, N * D > 2^31 elements (4 GiB of fp16): the last rows must still be right."""
    d, k = 8, 5
    n = (1 << 31) // d + 4099
    g = torch.Generator(device="cuda").manual_seed(0)
    z = torch.randn(n, d, device="cuda", dtype=torch.float16, generator=g)
    e = torch.randn(k, d, device="cuda", dtype=torch.float16, generator=g)
    indices, distances = nearest_code(z, e)
    tail = slice(n - 8192, n)
    ref_indices, ref_distances = nearest_code(z[tail].cpu(), e.cpu())
    check_near_optimal("cuda", z[tail].cpu(), e.cpu(), indices[tail].cpu(), distances[tail].cpu(),
                       "cuda rows past 2^31 elements")
    assert (indices[tail].cpu() == ref_indices).float().mean() > 0.99


@pytest.mark.cuda
def test_triton_64bit_offsets():
    """Triton kernel, N * D > 2^31 elements: rows at the end of z must not wrap around."""
    d, k = 1024, 16
    n = 2**31 // d + 37
    generator = torch.Generator(device="cuda").manual_seed(0)
    codebook = torch.randint(-1, 2, (k, d), generator=generator, device="cuda").to(torch.bfloat16)
    planted = torch.randint(0, k, (n,), generator=generator, device="cuda")
    z = codebook[planted]
    z[-50:] += (0.01 * torch.randn(50, d, generator=generator, device="cuda")).to(torch.bfloat16)
    indices, distances = run_kernel("triton", z, codebook, "bf16")
    for rows in (slice(0, 50), slice(n - 50, n)):
        ref_indices, ref_distances = reference.nearest_code(z[rows], codebook)
        assert torch.equal(indices[rows], ref_indices), f"rows {rows}"
        torch.testing.assert_close(distances[rows], ref_distances, rtol=TRITON_DIST_RTOL,
                                   atol=TRITON_DIST_ATOL)


def run_code(code, env=None, timeout=600):
    return run_python("-c", textwrap.dedent(code), env={**os.environ, **(env or {})},
                      timeout=timeout)


@pytest.mark.parametrize("isa", ISAS)
def test_other_cpu_isas(isa):
    """The AVX2 and baseline builds of the SIMD loops (picked via ATEN_CPU_CAPABILITY)."""
    code = f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import search_tools as t
        assert torch.backends.cpu.get_cpu_capability() in ("AVX2", "DEFAULT", "NO AVX"), \\
            torch.backends.cpu.get_cpu_capability()
        g = torch.Generator().manual_seed(1234)
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            for n, k, d in [(97, 3, 1), (257, 130, 17), (513, 257, 16), (131, 67, 255)]:
                z, e = t.random_problem(n, k, d, dtype, g)
                what = f"{isa} {{dtype}} {{n}} {{k}} {{d}}"
                t.check_near_optimal("cpu", z, e, *t.run_kernel("cpu", z, e), what)
                z, e, own = t.separated_problem(n, k, d, dtype, g)
                assert torch.equal(t.run_kernel("cpu", z, e)[0], own)
        print("ok")
    """
    out = run_code(code, env={"ATEN_CPU_CAPABILITY": isa})
    assert out.returncode == 0 and "ok" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("dim", [8, 32])  # the direct path; GEMM tiles (or the bf16 screen)
def test_memory_is_not_n_by_k(dim):
    """N=65536, K=16384: an N x K fp32 matrix would be 4 GiB; allow < 64 MiB growth."""
    code = f"""
        import resource, torch, vqkernels
        op = torch.ops.vqkernels.nearest_code
        g = torch.Generator().manual_seed(0)
        z, e = torch.randn(65536, {dim}, generator=g), torch.randn(16384, {dim}, generator=g)
        sq = e.square().sum(1)
        op(z[:4], e[:4], sq[:4], "ieee")  # one-time library and thread-pool setup
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        indices, distances = op(z, e, sq, "ieee")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert indices.shape == (65536,) and distances.isfinite().all()
        print((after - before) / 1024)
    """
    out = run_code(code)
    assert out.returncode == 0, out.stdout + out.stderr
    growth_mib = float(out.stdout.split()[-1])
    assert growth_mib < 64, f"peak RSS grew by {growth_mib:.1f} MiB"


@pytest.mark.parametrize("device", [  # ids name the backend, for vqkernels/bench/evidence.py
    pytest.param("cpu", marks=pytest.mark.interpreter, id="triton-interp"),
    pytest.param("cuda", marks=pytest.mark.cuda, id="triton-cuda")])
@pytest.mark.parametrize("family,precision", [("half", "ieee"), ("fp32", "tf32"), ("fp32", "bf16"),
                                              ("fp32_ieee", "ieee")])
def test_every_triton_tuning_config(device, family, precision, generator):
    """Each autotuning candidate's tiles (and the BLOCK_D heuristic) give the right codes and
    (STATS) the right per-code counts and sums: on a GPU every config runs, not only the one
    autotuning picks."""
    dtype = torch.bfloat16 if family == "half" and device == "cuda" else torch.float32
    for d in (5, 40, 256):  # one D chunk, several for the small BLOCK_D_MAX, the DESIGN D
        if d == 256 and device == "cpu":
            continue  # too slow in the interpreter
        z, codebook, planted = separated_problem(300, 77, d, dtype, generator)
        z, codebook, planted = z.to(device), codebook.to(device), planted.to(device)
        for config in triton_search._CONFIGS[family]:
            indices, distances, counts, sums = launch_one_config(family, config, z, codebook,
                                                                 precision)
            assert torch.equal(indices, planted), f"{family} {precision} D={d} {config}"
            check_near_optimal("triton", z.cpu(), codebook.cpu(), indices.cpu(), distances.cpu(),
                               f"{family} D={d} {config}", precision)
            assert torch.equal(counts, torch.bincount(planted, minlength=77).int())
            expected_sums = torch.zeros_like(sums).index_add_(0, planted, z.float())
            torch.testing.assert_close(sums, expected_sums)


def launch_one_config(family, config, z, codebook, precision):
    """The search kernel with statistics at one autotuning config, bypassing the autotuner."""
    (n, d), k = z.shape, codebook.shape[0]
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    distances = torch.empty(n, device=z.device)
    counts = torch.zeros(k, dtype=torch.int32, device=z.device)
    sums = torch.zeros(k, d, device=z.device)
    launch = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    triton_search._TUNED[family].fn[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        z, codebook, codebook.float().square().sum(1), indices, distances, counts, sums,
        n, k, D=d, PRECISION=precision, STATS=True, **config.kwargs,
        **(launch if z.device.type == "cuda" else {}))
    return indices, distances, counts, sums
