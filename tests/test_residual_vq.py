"""vqkernels.ResidualVQ / GroupedResidualVQ against vector-quantize-pytorch and their twins."""
import functools

import pytest
import torch

from vqkernels.nn import (GroupedResidualVQ, ReferenceGroupedResidualVQ, ReferenceResidualVQ,
                          ResidualVQ, residual_vq)

DIM = 8
CONFIGS = {  # name: (constructor options, input shape)
    "default": (dict(num_quantizers=3, codebook_size=13), (3, 12, DIM)),
    # k-means on a small batch makes singleton clusters, whose rows the next stage sees as
    # residuals of ~0: near-ties that two searches may break apart. 120 rows, 4 codes.
    "kmeans": (dict(num_quantizers=3, codebook_size=4, kmeans_init=True, kmeans_iters=3),
               (4, 30, DIM)),
    "dead codes": (dict(num_quantizers=3, codebook_size=11, threshold_ema_dead_code=2),
                   (4, 9, DIM)),
    "sizes per stage": (dict(codebook_size=(7, 13, 5, 9), decay=0.9), (2, 15, DIM)),
    "dropout": (dict(num_quantizers=6, codebook_size=9, quantize_dropout=True,
                     quantize_dropout_cutoff_index=1, quantize_dropout_multiple_of=2),
                (3, 10, DIM)),
    "projection": (dict(num_quantizers=2, codebook_size=10, codebook_dim=4), (2, 11, DIM)),
    "image fmap": (dict(num_quantizers=2, codebook_size=10, accept_image_fmap=True,
                        commitment_weight=0.5), (2, DIM, 3, 4)),
    "cosine": (dict(num_quantizers=2, codebook_size=10, use_cosine_sim=True), (2, 11, DIM)),
}


def step(module, x, upstream, seed):
    """One forward (+ backward in training), each stage starting torch's generator at its
    own seed, and again before its dead-code restarts: ops.replace_dead_codes_ draws its
    rows whether or not a code is dead (no host sync), where vector-quantize-pytorch skips
    the draw, so one shared stream would part after the first stage without dead codes (and
    ResidualVQ restarts each stage's codes after the last stage's search)."""
    def reseed(stage_seed):
        def hook(*_):
            torch.manual_seed(stage_seed)
        return hook

    def reseeded(expire, stage_seed):
        def run(*args, **kwargs):
            torch.manual_seed(stage_seed)
            return expire(*args, **kwargs)
        return run

    stages = [layer for rvq in getattr(module, "rvqs", [module]) for layer in rvq.layers]
    hooks = [layer.register_forward_pre_hook(reseed(seed * 100 + i))
             for i, layer in enumerate(stages)]
    owners = [(layer, "_expire") if hasattr(layer, "_expire") else
              (layer._codebook, "expire_codes_") for layer in stages]  # ours / theirs
    for i, (owner, name) in enumerate(owners):
        setattr(owner, name, reseeded(getattr(owner, name), seed * 100 + 50 + i))
    x = x.clone().requires_grad_(module.training)
    torch.manual_seed(seed)  # the same quantize-dropout draw
    try:
        quantized, indices, losses = module(x)
    finally:
        for hook in hooks:
            hook.remove()
        for owner, name in owners:
            delattr(owner, name)  # the class's method again
    if module.training:
        ((quantized * upstream).sum() + losses.sum()).backward()
    return quantized.detach(), indices, losses.detach(), x.grad


def assert_steps_match(ours, theirs, shape, generator, steps=3, exact_indices=True):
    for i in range(steps):
        x = 2 * torch.randn(shape, generator=generator)
        got, expected = step(ours, x, x, 10 + i), step(theirs, x, x, 10 + i)
        if exact_indices:
            assert torch.equal(got[1], expected[1]), f"step {i}: indices differ"
        for name, a, b in zip(("quantized", "losses", "x.grad"), got[:1] + got[2:],
                              expected[:1] + expected[2:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {i}: {name}")
        mine = ours.state_dict()
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(mine[key], value, rtol=1e-5, atol=1e-5,
                                       msg=f"step {i}: {key}")


# vector-quantize-pytorch 1.32's ResidualVQ fails on image feature maps (it stacks the
# residuals as if channel-last): that config is held to the twin only.
@pytest.mark.parametrize("config", [name for name in CONFIGS if name != "image fmap"])
def test_matches_vector_quantize_pytorch(config, generator):
    """Step for step against the real thing (rotation trick off), training then eval."""
    vqp = pytest.importorskip("vector_quantize_pytorch")
    options, shape = CONFIGS[config]
    torch.manual_seed(0)
    theirs = vqp.ResidualVQ(dim=DIM, rotation_trick=False, **options)
    ours = ResidualVQ(dim=DIM, **options)
    ours.load_state_dict(theirs.state_dict())
    assert_steps_match(ours, theirs, shape, generator)
    ours.eval(), theirs.eval()
    assert_steps_match(ours, theirs, shape, generator, steps=1)


def test_grouped_matches_vector_quantize_pytorch(generator):
    vqp = pytest.importorskip("vector_quantize_pytorch")
    options = dict(dim=DIM, groups=2, num_quantizers=3, codebook_size=4, quantize_dropout=True,
                   kmeans_init=True, kmeans_iters=2)
    torch.manual_seed(0)
    theirs = vqp.GroupedResidualVQ(rotation_trick=False, **options)
    ours = GroupedResidualVQ(**options)
    ours.load_state_dict(theirs.state_dict())
    assert_steps_match(ours, theirs, (2, 60, DIM), generator)


def test_checkpoints_load_both_ways():
    vqp = pytest.importorskip("vector_quantize_pytorch")
    options = dict(dim=DIM, num_quantizers=3, codebook_size=(5, 6, 7), codebook_dim=4)
    theirs, ours = vqp.ResidualVQ(**options), ResidualVQ(**options)
    ours.load_state_dict(theirs.state_dict())  # strict: the same keys and shapes
    theirs.load_state_dict(ours.state_dict())
    assert "layers.2._codebook.embed_avg" in ours.state_dict()
    grouped = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=5)
    vqp.GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=5).load_state_dict(
        grouped.state_dict())


@pytest.mark.parametrize("backend", ["reference", None, pytest.param(
    "triton", marks=pytest.mark.interpreter)], ids=["reference", "auto", "triton-interp"])
@pytest.mark.parametrize("config", ["kmeans", "dead codes", "dropout", "image fmap"])
def test_matches_twin(config, backend, generator):
    """On the fused ops (any backend) as on the pure-PyTorch twin; indices may differ only
    on ties, which random data in float32 make rare enough to compare exactly."""
    options, shape = CONFIGS[config]
    torch.manual_seed(0)
    ours = ResidualVQ(dim=DIM, backend=backend, **options)
    twin = ReferenceResidualVQ(dim=DIM, **options)
    twin.load_state_dict(ours.state_dict())
    assert_steps_match(ours, twin, shape, generator)


def test_grouped_twin(generator):
    options = dict(dim=DIM, groups=4, num_quantizers=2, codebook_size=6, threshold_ema_dead_code=1)
    torch.manual_seed(0)
    ours, twin = GroupedResidualVQ(**options), ReferenceGroupedResidualVQ(**options)
    twin.load_state_dict(ours.state_dict())
    assert_steps_match(ours, twin, (2, 9, DIM), generator)


def test_codes_and_output_from_indices(generator):
    rvq = ResidualVQ(dim=DIM, num_quantizers=3, codebook_size=(5, 8, 6), codebook_dim=6).eval()
    x = torch.randn(2, 7, DIM, generator=generator)
    quantized, indices, losses, codes = rvq(x, return_all_codes=True)
    assert indices.shape == (2, 7, 3) and losses.shape == (3,) and codes.shape == (3, 2, 7, 6)
    assert not isinstance(rvq.codebooks, torch.Tensor) and len(rvq.codebooks) == 3
    torch.testing.assert_close(rvq.get_output_from_indices(indices), quantized)
    torch.testing.assert_close(rvq.project_out(codes.sum(0)), quantized)
    assert torch.equal(codes[1], rvq.layers[1].codebook[indices[..., 1]])


def test_grouped_codes_and_output_from_indices(generator):
    grvq = GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=3, codebook_size=5).eval()
    x = torch.randn(2, 7, DIM, generator=generator)
    quantized, indices, losses, codes = grvq(x, return_all_codes=True)
    assert indices.shape == (2, 2, 7, 3) and losses.shape == (2, 3)
    assert codes.shape == (2, 3, 2, 7, DIM // 2) and grvq.codebooks.shape == (2, 3, 5, DIM // 2)
    torch.testing.assert_close(grvq.get_output_from_indices(indices), quantized)
    torch.testing.assert_close(grvq.get_codes_from_indices(indices), codes)


def test_dropped_stages_have_index_minus_one_and_no_codes(generator):
    rvq = ResidualVQ(dim=DIM, num_quantizers=4, codebook_size=5, quantize_dropout=True)
    x = torch.randn(3, 6, DIM, generator=generator)
    seen = set()
    for seed in range(40):
        _, indices, losses = rvq(x, rand_quantize_dropout_fixed_seed=seed)
        kept = int((indices[0, 0] >= 0).sum())
        seen.add(kept)
        assert (indices[..., kept:] == -1).all() and (indices[..., :kept] >= 0).all()
        assert (losses[kept:] == 0).all()
        codes = rvq.get_codes_from_indices(indices)
        assert (codes[kept:] == 0).all()
        short = rvq.get_output_from_indices(indices[..., :kept])  # coarse indices are fine
        torch.testing.assert_close(short, codes.sum(0))
    assert seen == {1, 2, 3, 4}
    rvq.eval()
    assert (rvq(x)[1] >= 0).all()  # no dropout in eval


@pytest.mark.parametrize("options, match", [
    (dict(shared_codebook=True), "shared_codebook"),
    (dict(beam_size=4), "beam_size"),
    (dict(implicit_neural_codebook=True), "implicit_neural_codebook"),
    (dict(quant_grad_frac=0.5), "quant_grad_frac"),
    (dict(heads=2), "heads"),
    (dict(rotation_trick=True), "rotation_trick"),
    (dict(num_quantizers=3, codebook_size=(4, 5)), "one codebook size per stage"),
    (dict(quantize_dropout_cutoff_index=3), "quantize_dropout_cutoff_index"),
])
def test_unsupported_or_bad_options_name_themselves(options, match):
    options = {"num_quantizers": 3, "codebook_size": 5, **options}
    with pytest.raises(ValueError, match=match):
        ResidualVQ(dim=DIM, **options)


def test_bad_calls_name_the_problem(generator):
    rvq = ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=5)
    x = torch.randn(2, 3, DIM, generator=generator)
    with pytest.raises(ValueError, match="mask"):
        rvq(x, mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="features"):
        rvq(torch.randn(2, 3, DIM + 1))
    with pytest.raises(ValueError, match="only valid with quantize_dropout"):
        rvq.get_codes_from_indices(torch.zeros(2, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="groups"):
        GroupedResidualVQ(dim=DIM, groups=3, num_quantizers=2, codebook_size=5)


def count_calls(monkeypatch) -> list[str]:
    """The names of the residual searches and EMA updates of every stage that ResidualVQ
    makes from now on, in order."""
    calls = []
    for name in ("residual_nearest_code", "residual_nearest_code_with_stats",
                 "ema_update_stages_"):
        monkeypatch.setattr(residual_vq.ops, name, functools.partial(
            lambda op, *args, **kwargs: calls.append(op.__name__) or op(*args, **kwargs),
            getattr(residual_vq.ops, name)))
    return calls


def assert_fused_is_stage_by_stage(options, shape, generator):
    """Training steps then an eval step of ResidualVQ(**options) against its stages searching
    one by one."""
    torch.manual_seed(0)
    fused, staged = ResidualVQ(dim=DIM, **options), ResidualVQ(dim=DIM, **options)
    staged.fuse_stages = False
    staged.load_state_dict(fused.state_dict())
    assert_steps_match(fused, staged, shape, generator)
    fused.eval(), staged.eval()
    assert_steps_match(fused, staged, shape, generator, steps=1)


@pytest.mark.parametrize("config", ["default", "dead codes", "sizes per stage", "dropout",
                                    "projection", "cosine"])
def test_one_search_for_all_stages_is_the_stage_by_stage_module(config, generator, monkeypatch):
    """After the first step (the stages' init) every step searches all stages in one
    ops.residual_nearest_code and updates all their codebooks in one ops.ema_update_stages_;
    the module trains as its stages searching and updating one by one do. On the CPU each
    stage counts its own residual for the EMA step (a pass the C++ search would not save)."""
    calls = count_calls(monkeypatch)
    assert_fused_is_stage_by_stage(*CONFIGS[config], generator)
    assert calls == ([] if config == "cosine" else ["residual_nearest_code", "ema_update_stages_"]
                     * 2 + ["residual_nearest_code"])


@pytest.mark.interpreter
@pytest.mark.parametrize("config", ["default", "dead codes"])
def test_the_triton_search_hands_each_stage_its_statistics(config, generator, monkeypatch):
    """On Triton the training steps take every stage's EMA statistics from the search pass
    (ops.residual_nearest_code_with_stats); eval searches without them."""
    calls = count_calls(monkeypatch)
    options, shape = CONFIGS[config]
    assert_fused_is_stage_by_stage({**options, "backend": "triton"}, shape, generator)
    assert calls == (["residual_nearest_code_with_stats", "ema_update_stages_"] * 2
                     + ["residual_nearest_code"])
