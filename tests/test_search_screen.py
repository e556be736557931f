"""The bf16 screen of the C++ CPU search (csrc/cpu/search_screen.h): on a processor with
AVX512-BF16, fp32 searches with D > 16 rank by bf16 products and re-score in fp32 every
code the products' error bound cannot rule out. These problems put the answer below bf16's
resolution, so a screen that dropped a candidate, or ranked by the bf16 products, fails
them. Elsewhere they hold the fp32 GEMM path to the same answers.
"""
import pathlib

import pytest
import torch

from search_tools import check_near_optimal, run_kernel, true_distances
from vqkernels import _ext

F64 = torch.float64
pytestmark = pytest.mark.skipif(_ext._C is None, reason="needs the C++ extension")


def cpu_has_bf16_dot_products():
    flags = pathlib.Path("/proc/cpuinfo")
    return flags.exists() and "avx512_bf16" in flags.read_text()


def test_screen_is_on_where_the_processor_has_bf16_dot_products():
    capability = torch.backends.cpu.get_cpu_capability()
    expected = cpu_has_bf16_dot_products() and capability == "AVX512"
    assert _ext.build_info()["cpu_search_screen"] == expected


def shell_codebook(z, k, radius, gaps, generator):
    """k codes around z at squared distance radius^2 + gaps[i] (float64, exact enough)."""
    directions = torch.randn(k, z.shape[0], generator=generator, dtype=F64)
    directions /= directions.norm(dim=1, keepdim=True)
    return z + directions * (radius ** 2 + gaps).sqrt()[:, None]


def bf16_ranking(z, codebook):
    """The index a search would pick ranking by bf16 products alone."""
    zb, eb = z.bfloat16().double(), codebook.bfloat16().double()
    return (codebook.double().square().sum(1) - 2 * zb @ eb.T).argmin(1)


@pytest.mark.parametrize("n, k, d", [(1, 1000, 255), (7, 513, 64), (64, 2048, 256)])
def test_near_ties_below_bf16_resolution_go_to_the_fp32_best(n, k, d):
    """Codes on a shell around each row's centre, their distances 0.05 to 0.1 apart: fp32
    ranks them exactly, bf16 products (errors ~0.1 at this size) do not."""
    g = torch.Generator().manual_seed(n * 10007 + k)
    centre = 3 * torch.randn(d, generator=g, dtype=F64)
    gaps = 0.05 + 0.05 * torch.rand(k, generator=g, dtype=F64)
    gaps[: k // 4] += 1000  # far codes: the screen rules them out
    gaps[torch.randint(0, k, (1,), generator=g)] = 0
    codebook = shell_codebook(centre, k, 4 * d ** 0.5, gaps, g).float()
    z = (centre + 1e-5 * torch.randn(n, d, generator=g, dtype=F64)).float()
    truth = true_distances(z, codebook)
    order = truth.sort(1).values
    assert (order[:, 1] - order[:, 0] > 0.04).all(), "the problem must be far from a tie in fp32"
    expected = truth.argmin(1)
    assert (bf16_ranking(z, codebook) != expected).any(), "bf16 products alone must fail here"
    indices, distances = run_kernel("cpu", z, codebook)
    assert torch.equal(indices, expected)


@pytest.mark.parametrize("scale", [2.0 ** 57, 1e-30])
def test_rows_and_codes_beyond_the_screens_range(scale):
    """Norms above 2^60 get an infinite bound (re-scored in fp32); tiny values, flushed by
    the bf16 products, stay within the bound's floor."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(40, 96, generator=g, dtype=F64)
    codebook = torch.randn(300, 96, generator=g, dtype=F64)
    z[::3] *= scale
    codebook[::5] *= scale
    z, codebook = z.float(), codebook.float()
    check_near_optimal("cpu", z, codebook, *run_kernel("cpu", z, codebook), f"scale {scale}")


@pytest.mark.parametrize("d", [40, 256])
def test_identical_codes_go_to_the_lowest_index(d):
    """Every code a candidate: the block turns to fp32 GEMM tiles, and ties still go to the
    lowest index, also across a screened tile (code 100) and GEMM tiles (from code 512)."""
    g = torch.Generator().manual_seed(d)
    near = torch.randn(d, generator=g)
    codebook = torch.randn(1112, d, generator=g) + 50  # far codes, never candidates
    codebook[512:] = near
    z = near + 0.01 * torch.randn(300, d, generator=g)
    indices, distances = run_kernel("cpu", z, codebook)
    assert (indices == 512).all()
    torch.testing.assert_close(distances, (z - near).square().sum(1))
    codebook[100] = near
    assert (run_kernel("cpu", z, codebook)[0] == 100).all()
    assert (run_kernel("cpu", z, near.expand(1000, d))[0] == 0).all()
