"""EMA codebook update and its statistics through vqkernels.ops, every backend."""
import os
import textwrap

import pytest
import torch

import vqkernels
from vqkernels import ops
from vqkernels.reference import ema as reference
from helpers import kernel_backends, run_python
from vqkernels.testing import assert_code_stats, assert_within_contract

BACKENDS = [pytest.param("reference", "cpu", id="reference")] + kernel_backends()
# (N, K, D, which codes the rows go to)
SHAPES = [(0, 5, 3, "random"), (1, 1, 1, "random"), (37, 1, 3, "random"),
          (40, 13, 1, "half"), (61, 7, 255, "random"), (50, 9, 3, "one")]
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
          (torch.bfloat16, torch.bfloat16)]  # (z, codebook)
DECAY, EPS, STEP = 0.9, 1e-5, 3


def skip_unsupported(backend, device, z_dtype, codebook_dtype):
    if device == "cpu" and backend == "triton" and (z_dtype, codebook_dtype) != (torch.float32,) * 2:
        pytest.skip("the interpreter tests run fp32")


def make_batch(n, k, d, hit, generator, dtype=torch.float32):
    z = torch.randn(n, d, generator=generator).to(dtype)
    if hit == "one":  # every row to one code
        indices = torch.full((n,), k // 2, dtype=torch.int64)
    elif hit == "half":  # the upper codes are never hit
        indices = torch.randint(0, max(1, k // 2), (n,), generator=generator)
    else:
        indices = torch.randint(0, k, (n,), generator=generator)
    return z, indices


def make_state(k, d, generator, codebook_dtype=torch.float32):
    cluster_size = torch.rand(k, generator=generator) + 0.5
    embed_sum = torch.randn(k, d, generator=generator) * cluster_size[:, None]
    codebook = torch.randn(k, d, generator=generator).to(codebook_dtype)
    return [cluster_size, embed_sum, codebook]


def updated(state, z, indices, device="cpu", **kwargs):
    """ops.ema_update_ on copies of the state; returns them on the CPU."""
    out = [t.clone().to(device) for t in state]
    ops.ema_update_(*out, z.to(device), indices.to(device), decay=DECAY, eps=EPS, **kwargs)
    return [t.cpu() for t in out]


def reference_updated(state, z, indices, dtype=None, bias_correction=False):
    """The reference update on copies, in ``dtype`` (None: the inputs' own dtypes)."""
    out = [t.clone() if dtype is None else t.to(dtype) for t in state]
    z = z if dtype is None else z.to(dtype)
    reference.ema_update_(*out, z, indices, DECAY, EPS, bias_correction,
                          STEP if bias_correction else None)
    return out


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,k,d,hit", SHAPES)
@pytest.mark.parametrize("z_dtype,codebook_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_ema_update_matches_float64_reference(backend, device, n, k, d, hit, z_dtype,
                                              codebook_dtype, bias_correction, generator):
    skip_unsupported(backend, device, z_dtype, codebook_dtype)
    z, indices = make_batch(n, k, d, hit, generator, z_dtype)
    state = make_state(k, d, generator, codebook_dtype)
    step = STEP if bias_correction else None
    got = updated(state, z, indices, device, bias_correction=bias_correction, step=step,
                  backend=backend)
    same = reference_updated(state, z, indices, bias_correction=bias_correction)
    truth = reference_updated(state, z, indices, torch.float64, bias_correction)
    for name, g, s, t in zip(("cluster_size", "embed_sum", "codebook"), got, same, truth):
        assert g.dtype == s.dtype, f"{name} dtype {g.dtype} != {s.dtype}"
        assert_within_contract("ema_update", g.dtype, g, s, t, what=f"{backend} {name}")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n,k,d,hit", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_code_counts_and_sums_match_reference(backend, device, n, k, d, hit, deterministic,
                                              generator):
    z, indices = make_batch(n, k, d, hit, generator)
    counts, sums = ops.code_counts_and_sums(z.to(device), indices.to(device).int(), k,
                                            deterministic=deterministic, backend=backend)
    assert_code_stats(z, indices, k, counts, sums, what=backend)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_ema_update_from_stats_equals_the_fused_update(backend, device, generator):
    z, indices = make_batch(53, 11, 6, "random", generator)
    state = make_state(11, 6, generator)
    fused = updated(state, z, indices, device, backend=backend, deterministic=True)
    stats = ops.code_counts_and_sums(z.to(device), indices.to(device), 11, deterministic=True,
                                     backend=backend)
    split = [t.clone().to(device) for t in state]
    ops.ema_update_(*split, decay=DECAY, eps=EPS, stats=stats, backend=backend)
    for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), fused, split):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_deterministic_mode_is_bitwise_reproducible(backend, device, generator):
    z, indices = make_batch(300, 7, 5, "random", generator)  # many rows per code
    state = make_state(7, 5, generator)
    runs = [updated(state, z, indices, device, deterministic=True, backend=backend)
            for _ in range(2)]
    for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), *runs):
        assert torch.equal(a, b), f"{backend}: {name} differs between two deterministic runs"


@pytest.mark.parametrize("deterministic", [False, True])
def test_cpu_kernel_is_independent_of_the_thread_count(deterministic, generator):
    z, indices = make_batch(20000, 37, 70, "random", generator)
    state = make_state(37, 70, generator)
    threads = torch.get_num_threads()
    try:
        results = []
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(updated(state, z, indices, deterministic=deterministic, backend="cpu")
                           + list(ops.code_counts_and_sums(z, indices, 37, backend="cpu")))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b), "the C++ CPU kernel depends on the thread count"


def test_cpu_kernel_is_bitwise_the_same_on_every_instruction_set(tmp_path, generator):
    """The AVX-512, AVX2 and baseline copies of the add loop (ATEN_CPU_CAPABILITY picks one)
    give the same bits: short rows (D = 8) and long rows (D = 70, listed and prefetched).
    The data is drawn here: torch's own randn differs between capabilities."""
    batches = [(*make_batch(5000, 37, d, "random", generator, dtype), 37)
               for d in (8, 70) for dtype in (torch.float32, torch.bfloat16)]
    torch.save(batches, tmp_path / "batches.pt")
    code = textwrap.dedent("""
        import sys, torch
        from vqkernels import ops
        torch.save([ops.code_counts_and_sums(z, indices, k, backend="cpu")
                    for z, indices, k in torch.load(sys.argv[1])], sys.argv[2])
    """)
    results = {}
    for isa in ("native", "avx2", "default"):
        env = dict(os.environ)
        if isa != "native":
            env["ATEN_CPU_CAPABILITY"] = isa
        path = tmp_path / f"{isa}.pt"
        run = run_python("-c", code, str(tmp_path / "batches.pt"), str(path), env=env,
                         timeout=300)
        assert run.returncode == 0, run.stderr
        results[isa] = torch.load(path)
    for isa in ("avx2", "default"):
        for (counts, sums), (other_counts, other_sums) in zip(results["native"], results[isa]):
            assert torch.equal(counts, other_counts) and torch.equal(sums, other_sums), \
                f"ATEN_CPU_CAPABILITY={isa} changed the statistics"


@pytest.mark.cuda
def test_deterministic_cuda_stats_equal_the_cpu_kernel(generator):
    """Both sum each code's rows in row order in fp32: the same additions, bitwise."""
    z, indices = make_batch(5000, 33, 19, "random", generator, torch.bfloat16)
    cpu = ops.code_counts_and_sums(z, indices, 33, deterministic=True, backend="cpu")
    gpu = ops.code_counts_and_sums(z.cuda(), indices.cuda(), 33, deterministic=True,
                                   backend="cuda")
    assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())


def test_empty_batch_on_zero_state_keeps_the_codebook(generator):
    for backend, device in (("reference", "cpu"), ("cpu", "cpu")):
        codebook = torch.randn(4, 3, generator=generator)
        state = [torch.zeros(4), torch.zeros(4, 3), codebook]
        got = updated(state, torch.empty(0, 3), torch.empty(0, dtype=torch.int64), device,
                      backend=backend)
        assert torch.equal(got[2], codebook), backend


@pytest.mark.parametrize("backend", ["reference", "cpu", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_out_of_range_indices_raise_on_cpu_before_any_write(backend, generator):
    z, indices = make_batch(20, 5, 3, "random", generator)
    indices[7] = 5
    state = make_state(5, 3, generator)
    before = [t.clone() for t in state]
    with pytest.raises(ValueError, match=r"indices must be in \[0, 5\)"):
        ops.ema_update_(*state, z, indices, decay=DECAY, backend=backend)
    with pytest.raises(ValueError, match="indices"):
        ops.code_counts_and_sums(z, -indices, 5, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
@pytest.mark.parametrize("deterministic", [False, True])
def test_out_of_range_indices_are_skipped_on_gpu(backend, deterministic, generator):
    z, indices = make_batch(40, 5, 3, "random", generator)
    bad = indices.clone()
    bad[[3, 11]] = torch.tensor([-1, 5])
    keep = torch.ones(40, dtype=torch.bool)
    keep[[3, 11]] = False
    counts, sums = ops.code_counts_and_sums(z.cuda(), bad.cuda(), 5, backend=backend,
                                            deterministic=deterministic)
    ref_counts, ref_sums = reference.code_counts_and_sums(z[keep], indices[keep], 5)
    assert torch.equal(counts.cpu(), ref_counts)
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-5, atol=1e-5)


def test_codebook_may_be_a_parameter(generator):
    state = make_state(6, 4, generator)
    codebook = torch.nn.Parameter(state[2])
    z, indices = make_batch(30, 6, 4, "random", generator)
    ops.ema_update_(state[0], state[1], codebook, z, indices, decay=DECAY, backend="cpu")
    assert codebook.requires_grad and codebook.grad is None


def _bad(**changes):
    z, indices = torch.randn(6, 3), torch.tensor([0, 1, 2, 3, 0, 1])
    args = dict(cluster_size=torch.ones(4), embed_sum=torch.ones(4, 3), codebook=torch.ones(4, 3),
                z=z, indices=indices, decay=0.9)
    args.update(changes)
    return lambda: ops.ema_update_(**args)


@pytest.mark.parametrize("call,error,match", [
    (_bad(z=torch.ones(6)), ValueError, "z must be 2-D"),
    (_bad(z=torch.ones(6, 2)), ValueError, "z must have D = 3"),
    (_bad(z=torch.ones(6, 3, dtype=torch.int32)), TypeError, "z must be float"),
    (_bad(indices=torch.zeros(5, dtype=torch.int64)), ValueError, "indices must be 1-D of length N = 6"),
    (_bad(indices=torch.zeros(6)), TypeError, "indices must be int64 or int32"),
    (_bad(cluster_size=torch.ones(4, dtype=torch.float64)), TypeError, "cluster_size must be float32"),
    (_bad(cluster_size=torch.ones(4, 1)), ValueError, "cluster_size must be 1-D"),
    (_bad(embed_sum=torch.ones(5, 3)), ValueError, r"embed_sum must have shape \(4, 3\)"),
    (_bad(codebook=torch.ones(4, 3, dtype=torch.float16)), TypeError, "codebook must be float32 or z's dtype"),
    (_bad(codebook=torch.ones(1, 3).expand(4, 3)), ValueError,
     "codebook must not have elements sharing memory"),
    (_bad(decay=1.5), ValueError, "decay must be in"),
    (_bad(decay="0.9"), TypeError, "decay must be a number"),
    (_bad(eps=-1.0), ValueError, "eps must be"),
    (_bad(bias_correction=True), ValueError, "step must be an int >= 1"),
    (_bad(bias_correction=True, step=0), ValueError, "step must be an int >= 1"),
    (_bad(bias_correction=True, step=2, decay=1.0), ValueError, "decay must be < 1"),
    (_bad(stats=(torch.ones(4), torch.ones(4, 3))), ValueError, "not both"),
    (_bad(z=None, indices=None), ValueError, "pass z and indices"),
    (_bad(z=None, indices=None, stats=(torch.ones(4), torch.ones(4, 2))), ValueError, "stats sums"),
    (_bad(backend="cuda"), vqkernels.BackendUnavailableError, "needs a CUDA tensor"),
    (lambda: ops.code_counts_and_sums(torch.ones(3, 2), torch.zeros(3, dtype=torch.int64), 0),
     ValueError, "num_codes must be >= 1"),
    (lambda: ops.code_counts_and_sums(torch.ones(3, 2), torch.zeros(2, dtype=torch.int64), 4),
     ValueError, "indices must be 1-D"),
])
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --- torch.library ------------------------------------------------------------------------

def _op_cases():
    cases = [("code_counts_and_sums_triton", "stats"), ("ema_update_triton", "update"),
             ("ema_update_from_stats_triton", "from_stats")]
    marks = [pytest.mark.interpreter]
    params = [pytest.param(name, kind, marks=marks, id=name) for name, kind in cases]
    params += [pytest.param(name, kind, id=name) for name, kind in
               (("code_counts_and_sums", "stats"), ("ema_update", "update"),
                ("ema_update_from_stats", "from_stats"))]
    return params


@pytest.mark.parametrize("name,kind", _op_cases())
def test_opcheck(name, kind, generator):
    if not hasattr(torch.ops.vqkernels, name):
        pytest.skip(f"vqkernels::{name} is not registered (extension not built)")
    z, indices = make_batch(23, 5, 4, "random", generator)
    state = make_state(5, 4, generator)
    stats = reference.code_counts_and_sums(z, indices, 5)
    args = {"stats": (z, indices, 5, False),
            "update": (*state, z, indices, 0.9, 1e-5, True, 2, False),
            "from_stats": (*state, *stats, 0.9, 1e-5, False, 1)}[kind]
    torch.library.opcheck(getattr(torch.ops.vqkernels, name).default, args)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_ema_update_compiles_fullgraph(backend, generator):
    torch._dynamo.reset()
    z, indices = make_batch(41, 6, 5, "random", generator)
    state = make_state(6, 5, generator)

    def step(cluster_size, embed_sum, codebook, z, indices):
        ops.ema_update_(cluster_size, embed_sum, codebook, z, indices, decay=0.95,
                        bias_correction=True, step=4, backend=backend)
        return codebook * 2

    eager = [t.clone() for t in state]
    compiled = [t.clone() for t in state]
    expected = step(*eager, z, indices)
    got = torch.compile(step, fullgraph=True)(*compiled, z, indices)
    torch.testing.assert_close(got, expected)
    for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), compiled, eager):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}: {m}")
