"""ops.ema_update_stages_: the EMA step of every stage of a residual quantizer in one call,
equal to ops.ema_update_ of each stage on the same backend."""
from pathlib import Path

import pytest
import torch

from helpers import kernel_backends
from vqkernels import ops
from vqkernels.ops import ema

BACKENDS = [pytest.param("reference", "cpu", id="reference")] + kernel_backends()
SIZES, D = (7, 1, 12), 5  # the stages' K, their D
OPTIONS = dict(decay=0.9, eps=1e-5)


def make_stages(generator, sizes=SIZES, codebook_dtype=torch.float32, device="cpu"):
    """(state, stats) of each stage: cluster size (K,), embed sum (K, D), codebook (K, D);
    counts (K,) with some codes unused, sums (K, D)."""
    stages = []
    for k in sizes:
        cluster_size = torch.rand(k, generator=generator) + 0.5
        state = [cluster_size, torch.randn(k, D, generator=generator) * cluster_size[:, None],
                 torch.randn(k, D, generator=generator).to(codebook_dtype)]
        counts = torch.randint(0, 3, (k,), generator=generator).float()
        stats = (counts, torch.randn(k, D, generator=generator) * counts[:, None])
        stages.append(([t.to(device) for t in state], tuple(t.to(device) for t in stats)))
    return stages


def one_by_one(stages, backend, **options):
    """ops.ema_update_ of each stage on copies of its state."""
    out = []
    for state, stats in stages:
        state = [t.clone() for t in state]
        ops.ema_update_(*state, stats=stats, backend=backend, **options)
        out.append(state)
    return out


def together(stages, backend, **options):
    """ops.ema_update_stages_ on copies of every stage's state."""
    states = [[t.clone() for t in state] for state, _ in stages]
    ops.ema_update_stages_(*(list(column) for column in zip(*states)),
                           [stats for _, stats in stages], backend=backend, **options)
    return states


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("codebook_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_correction", [False, True])
def test_every_stage_as_ema_update_of_each(backend, device, codebook_dtype, bias_correction,
                                           generator):
    """Bit for bit: the CUDA launch pair of all stages runs the single update's math."""
    if backend == "triton" and device == "cpu" and codebook_dtype != torch.float32:
        pytest.skip("the interpreter tests run fp32")
    stages = make_stages(generator, codebook_dtype=codebook_dtype, device=device)
    options = dict(OPTIONS, bias_correction=bias_correction, step=3 if bias_correction else None)
    for stage, (got, expected) in enumerate(zip(together(stages, backend, **options),
                                                one_by_one(stages, backend, **options))):
        for name, a, b in zip(("cluster_size", "embed_sum", "codebook"), got, expected):
            assert torch.equal(a, b), f"stage {stage} {name}"


def test_strided_state_is_updated_in_place(generator):
    """A stage's (K, D) state may be a transposed view: updated through a copy, written back."""
    stages = make_stages(generator)
    expected = one_by_one(stages, "cpu", **OPTIONS)
    state = stages[2][0]
    state[1] = state[1].t().contiguous().t()
    got = together(stages, "cpu", **OPTIONS)
    assert not got[2][1].is_contiguous()
    assert all(torch.equal(a, b) for a, b in zip(got[2], expected[2]))


@pytest.mark.cuda
def test_more_stages_than_one_cuda_launch_takes(generator):
    stages = make_stages(generator, sizes=(3,) * (ema.CUDA_MAX_STAGES + 1), device="cuda")
    for got, expected in zip(together(stages, "cuda", **OPTIONS),
                             one_by_one(stages, "cuda", **OPTIONS)):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


@pytest.mark.cuda
def test_cuda_kernel_opcheck(generator):
    stages = make_stages(generator, device="cuda")
    columns = [list(column) for column in zip(*(state for state, _ in stages))]
    args = (*columns, [c for _, (c, _) in stages], [s for _, (_, s) in stages], 0.9, 1e-5,
            False, 1)
    torch.library.opcheck(torch.ops.vqkernels.ema_update_from_stats_stages.default, args)


@pytest.mark.cuda
def test_cuda_kernel_rejects_strided_statistics_and_float64_codebooks(generator):
    """The C++ op reads counts and sums in place: a strided one must raise, not be read as
    dense; a float64 codebook must raise before any stage's state changes."""
    stages = make_stages(generator, device="cuda")
    columns = [list(column) for column in zip(*(state for state, _ in stages))]
    counts, sums = [c for _, (c, _) in stages], [s for _, (_, s) in stages]
    op = torch.ops.vqkernels.ema_update_from_stats_stages
    strided = [torch.stack([s, s], -1)[..., 0] for s in sums]
    with pytest.raises(RuntimeError, match="contiguous"):
        op(*columns, counts, strided, 0.9, 1e-5, False, 1)
    before = [t.clone() for t in columns[0]]
    with pytest.raises(RuntimeError, match="codebook must be float32"):
        op(columns[0], columns[1], [c.double() for c in columns[2]], counts, sums, 0.9, 1e-5,
           False, 1)
    assert all(torch.equal(a, b) for a, b in zip(columns[0], before))


def test_the_cuda_limit_is_the_kernels():
    header = (Path(__file__).resolve().parents[1] / "csrc" / "cuda" / "kernels.h").read_text()
    assert f"kMaxEmaStages = {ema.CUDA_MAX_STAGES};" in header


def _call(stages, **changes):
    columns = {"cluster_sizes": [s[0][0] for s in stages], "embed_sums": [s[0][1] for s in stages],
               "codebooks": [s[0][2] for s in stages], "stats": [s[1] for s in stages]}
    columns.update(changes)
    ops.ema_update_stages_(**columns, **OPTIONS)


def test_bad_input_names_the_stage_and_argument(generator):
    stages = make_stages(generator)
    with pytest.raises(ValueError, match="one entry a stage, at least one, got 3 cluster_sizes, "
                                         "3 embed_sums, 2 codebooks"):
        _call(stages, codebooks=[s[0][2] for s in stages[:2]])
    with pytest.raises(ValueError, match="at least one"):
        _call([], cluster_sizes=[], embed_sums=[], codebooks=[], stats=[])
    with pytest.raises(TypeError, match="stats must be a list or tuple"):
        _call(stages, stats=iter([s[1] for s in stages]))
    bad_stats = [s[1] for s in stages]
    bad_stats[1] = (bad_stats[1][0][:0], bad_stats[1][1])
    with pytest.raises(ValueError, match=r"stage 1: stats counts must have shape \(1,\)"):
        _call(stages, stats=bad_stats)
    wide = make_stages(generator, sizes=(4,))[0]
    wide = ([wide[0][0], torch.zeros(4, D + 1), torch.zeros(4, D + 1)],
            (wide[1][0], torch.zeros(4, D + 1)))
    with pytest.raises(ValueError, match="stage 3: every stage must be on one device with one D"):
        _call(stages + [wide], **{})


def test_compiles_fullgraph(generator):
    torch._dynamo.reset()
    stages = make_stages(generator)

    def step(states, stats):
        ops.ema_update_stages_(*(list(column) for column in zip(*states)), stats, **OPTIONS)
        return [state[2] * 2 for state in states]

    eager = [[t.clone() for t in state] for state, _ in stages]
    compiled = [[t.clone() for t in state] for state, _ in stages]
    stats = [stats for _, stats in stages]
    expected = step(eager, stats)
    got = torch.compile(step, fullgraph=True)(compiled, stats)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
