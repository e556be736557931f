"""vqkernels.VectorQuantize against its pure-PyTorch twin and vector-quantize-pytorch's contract."""
import math

import pytest
import torch

import vqkernels
from vqkernels.nn import ReferenceVectorQuantize, VectorQuantize
from vqkernels.reference import search as reference_search

DIM, CODES = 6, 17
CONFIGS = {  # name: (constructor options, input shape)
    "default": ({}, (3, 12, DIM)),
    "kmeans+dead": (dict(kmeans_init=True, kmeans_iters=4, threshold_ema_dead_code=2),
                    (3, 12, DIM)),
    "cosine+dead": (dict(use_cosine_sim=True, threshold_ema_dead_code=1.5), (2, 11, DIM)),
    "cosine+kmeans": (dict(use_cosine_sim=True, kmeans_init=True, kmeans_iters=3), (4, 9, DIM)),
    "dead,few rows": (dict(threshold_ema_dead_code=3, decay=0.5), (1, 7, DIM)),
    "no ema,dead": (dict(ema_update=False, threshold_ema_dead_code=2), (2, 13, DIM)),
    "channel first": (dict(channel_last=False, commitment_weight=0.3), (2, DIM, 10)),
    "image fmap": (dict(accept_image_fmap=True, decay=0.9), (2, DIM, 3, 5)),
}


def twins(options, backend=None, seed=0):
    torch.manual_seed(seed)
    fast = VectorQuantize(DIM, CODES, backend=backend, **options)
    twin = ReferenceVectorQuantize(DIM, CODES, **options)
    twin.load_state_dict(fast.state_dict())
    return fast, twin


def step(module, x, upstream, seed):
    x = x.clone().requires_grad_(module.training)
    torch.manual_seed(seed)  # the same draws for k-means and restarts
    quantize, indices, loss = module(x)
    if module.training:
        ((quantize * upstream).sum() + loss).backward()
    return quantize.detach(), indices, loss.detach(), x.grad


def near_ties(module, codebook, x, got, expected):
    """Rows where two searches disagree must be ties to rounding (random data)."""
    tokens, _ = module._to_tokens(x)
    flat, codes = tokens.reshape(-1, DIM).double(), codebook.double()
    if module.use_cosine_sim:
        flat, codes = (torch.nn.functional.normalize(t, dim=-1) for t in (flat, codes))
    differ = got.reshape(-1) != expected.reshape(-1)

    def distance(ind):
        return ((flat - codes[ind.reshape(-1)]) ** 2).sum(1)[differ]

    scale = flat[differ].square().sum(1) + codes.square().sum(1).max()
    gap = (distance(got) - distance(expected)).abs()
    assert (gap <= 1e-5 * scale).all(), f"indices differ beyond ties: gaps {gap}"


@pytest.mark.parametrize("backend", ["reference", None, pytest.param(
    "triton", marks=pytest.mark.interpreter)], ids=["reference", "auto", "triton-interp"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_matches_twin_over_training_and_eval(config, backend, generator):
    options, shape = CONFIGS[config]
    fast, twin = twins(options, backend)
    for i, training in enumerate([True, True, True, False, True]):
        fast.train(training), twin.train(training)
        x = 2 * torch.randn(shape, generator=generator)
        upstream = torch.randn(shape, generator=generator)
        before = {k: v.clone() for k, v in fast.state_dict().items()}
        codebook_before = fast.codebook.clone()
        got, expected = step(fast, x, upstream, 100 + i), step(twin, x, upstream, 100 + i)
        if not torch.equal(got[1], expected[1]):
            assert backend != "reference", "the reference search must agree exactly"
            near_ties(fast, codebook_before, x, got[1], expected[1])
            twin.load_state_dict(fast.state_dict())  # a tie went the other way: resync
            continue
        names = ("quantize", "indices", "loss", "grad x")
        for name, a, b in zip(names, got, expected):
            if a is None or b is None:
                assert a is None and b is None, name
                continue
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {i} {name}: {m}")
        for key, value in fast.state_dict().items():
            torch.testing.assert_close(value, twin.state_dict()[key], rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"step {i} buffer {key}: {m}")
        if not training:
            assert got[2].item() == 0 and got[3] is None
            assert all(torch.equal(v, before[k]) for k, v in fast.state_dict().items())
            assert torch.equal(got[0], codebook_before[got[1]].movedim(-1, 1)
                               if fast.accept_image_fmap or not fast.channel_last
                               else codebook_before[got[1]])


def test_straight_through_gradient_and_commitment_loss(generator):
    vq = VectorQuantize(DIM, CODES, commitment_weight=0.7)
    x = torch.randn(2, 9, DIM, generator=generator, requires_grad=True)
    upstream = torch.randn(2, 9, DIM, generator=generator)
    codebook = vq.codebook.clone()
    quantize, indices, loss = vq(x)
    codes = codebook[indices]
    torch.testing.assert_close(quantize, codes)  # x + sg(q - x): the codes up to a rounding
    torch.testing.assert_close(loss, 0.7 * ((codes - x) ** 2).mean())
    assert loss.shape == ()
    ((quantize * upstream).sum() + loss).backward()
    torch.testing.assert_close(x.grad, upstream + 0.7 * 2 * (x - codes).detach() / x.numel())


def test_buffers_match_vector_quantize_pytorch():
    vq = VectorQuantize(DIM, CODES)
    state = vq.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "_codebook.initted": ((), torch.bool),
        "_codebook.cluster_size": ((1, CODES), torch.float32),
        "_codebook.embed_avg": ((1, CODES, DIM), torch.float32),
        "_codebook.embed": ((1, CODES, DIM), torch.float32),
    }
    bound = math.sqrt(6 / (CODES * DIM))  # kaiming_uniform_ on a (1, K, D) tensor
    assert bool(state["_codebook.initted"]) and vq.codebook.abs().max() <= bound
    assert torch.equal(state["_codebook.embed_avg"], state["_codebook.embed"])
    assert torch.equal(state["_codebook.cluster_size"], torch.ones(1, CODES))
    lazy = VectorQuantize(DIM, CODES, kmeans_init=True).state_dict()
    assert not lazy["_codebook.initted"] and not lazy["_codebook.embed"].any()


@pytest.mark.parametrize("initted", [torch.tensor(True), torch.Tensor([1.0])],
                         ids=["current", "float (1,) before 1.20"])
def test_loads_vector_quantize_pytorch_checkpoints(initted, generator):
    checkpoint = {
        "_codebook.initted": initted,
        "_codebook.cluster_size": torch.rand(1, CODES, generator=generator),
        "_codebook.embed_avg": torch.randn(1, CODES, DIM, generator=generator),
        "_codebook.embed": torch.randn(1, CODES, DIM, generator=generator),
    }
    vq = VectorQuantize(DIM, CODES, kmeans_init=True)
    vq.load_state_dict(checkpoint)
    assert torch.equal(vq.codebook, checkpoint["_codebook.embed"][0])
    x = torch.randn(2, 5, DIM, generator=generator)
    _, indices, _ = vq.eval()(x)  # initted: no k-means over the loaded codebook
    assert torch.equal(vq.codebook, checkpoint["_codebook.embed"][0])
    expected, _ = reference_search.nearest_code(x.reshape(-1, DIM), vq.codebook)
    assert torch.equal(indices.reshape(-1), expected)


def test_kmeans_init_runs_once_and_again_after_loading_an_uninitted_state(generator):
    vq = VectorQuantize(DIM, CODES, kmeans_init=True).eval()  # the init runs in eval too
    fresh = vq.state_dict()
    x = torch.randn(4, 10, DIM, generator=generator)
    vq(x)
    first = vq.codebook.clone()
    assert bool(vq._codebook.initted) and first.abs().sum() > 0
    vq(torch.randn(4, 10, DIM, generator=generator))
    assert torch.equal(vq.codebook, first)
    vq.load_state_dict(fresh)
    vq(x)
    assert not torch.equal(vq.codebook, torch.zeros_like(first))


@pytest.mark.parametrize("options,shape,indices_shape", [
    (dict(accept_image_fmap=True), (2, DIM, 3, 5), (2, 3, 5)),
    (dict(accept_3d_fmap=True), (2, DIM, 2, 3, 4), (2, 2, 3, 4)),
    (dict(channel_last=False), (2, DIM, 7), (2, 7)),
    (dict(), (2, 7, DIM), (2, 7)),
    (dict(), (5, DIM), (5,)),
])
def test_layouts(options, shape, indices_shape, generator):
    vq = VectorQuantize(DIM, CODES, **options)
    x = torch.randn(shape, generator=generator)
    for training in (True, False):
        quantize, indices, loss = vq.train(training)(x)
        assert quantize.shape == x.shape and indices.shape == indices_shape and loss.shape == ()
    torch.testing.assert_close(vq.get_codes_from_indices(indices), quantize)
    torch.testing.assert_close(vq.get_output_from_indices(indices), quantize)


def test_freeze_codebook_and_loss_breakdown(generator):
    vq = VectorQuantize(DIM, CODES, threshold_ema_dead_code=2)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    x = torch.randn(2, 8, DIM, generator=generator)
    _, _, loss, breakdown = vq(x, freeze_codebook=True, return_loss_breakdown=True)
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())
    assert torch.equal(loss, breakdown.commitment) and breakdown.orthogonal_reg == 0
    vq(x)
    assert not torch.equal(vq.codebook, before["_codebook.embed"][0])


@pytest.mark.parametrize("options,match", [
    (dict(heads=2), "heads"), (dict(separate_codebook_per_head=True), "separate_codebook"),
    (dict(codebook_dim=3), "codebook_dim"), (dict(orthogonal_reg_weight=0.1), "orthogonal"),
    (dict(stochastic_sample_codes=True), "stochastic"), (dict(rotation_trick=True), "rotation"),
    (dict(learnable_codebook=True), "learnable"), (dict(affine_param=True), "affine"),
    (dict(sync_update_v=0.5), "sync_update_v"), (dict(directional_reparam=True), "directional"),
    (dict(commitment_use_cross_entropy_loss=True), "cross_entropy"),
    (dict(in_place_codebook_optimizer=torch.optim.SGD), "in_place"),
    (dict(decay=1.5), "decay"), (dict(accept_image_fmap=True, accept_3d_fmap=True), "exclusive"),
])
def test_unsupported_options_name_themselves(options, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantize(DIM, CODES, **options)


def test_default_values_of_unsupported_options_are_accepted():
    VectorQuantize(DIM, CODES, codebook_dim=DIM, heads=1, rotation_trick=False,
                   learnable_codebook=False, orthogonal_reg_weight=0.0, sample_codebook_temp=0.5)
    with pytest.raises(TypeError, match="no_such_option"):
        VectorQuantize(DIM, CODES, no_such_option=1)


@pytest.mark.parametrize("kwargs,match", [(dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
                                          (dict(indices=torch.zeros(2, 4).long()), "indices"),
                                          (dict(topk=2), "topk")])
def test_unsupported_forward_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VectorQuantize(DIM, CODES)(torch.randn(2, 4, DIM), **kwargs)


def test_wrong_shapes_name_the_problem():
    with pytest.raises(ValueError, match="features"):
        VectorQuantize(DIM, CODES)(torch.randn(2, 4, DIM + 1))
    with pytest.raises(ValueError, match=r"\(B, D, H, W\)"):
        VectorQuantize(DIM, CODES, accept_image_fmap=True)(torch.randn(2, 4, DIM))


def test_top_level_export():
    assert vqkernels.VectorQuantize is VectorQuantize


@pytest.mark.parametrize("options", [dict(), dict(kmeans_init=True, threshold_ema_dead_code=2),
                                     dict(use_cosine_sim=True, kmeans_init=True,
                                          threshold_ema_dead_code=2)])
def test_matches_vector_quantize_pytorch(options, generator):
    """Step for step against the real thing (a test dependency, pinned in pyproject.toml;
    skipped where it is missing, as on the GPU machine)."""
    vector_quantize_pytorch = pytest.importorskip("vector_quantize_pytorch")
    torch.manual_seed(0)
    theirs = vector_quantize_pytorch.VectorQuantize(DIM, CODES, rotation_trick=False, **options)
    ours = VectorQuantize(DIM, CODES, **options)
    ours.load_state_dict(theirs.state_dict())
    for i in range(4):
        x = 2 * torch.randn(4, 9, DIM, generator=generator)  # N = 36 >= K: the same draws
        got, expected = step(ours, x, x, 10 + i), step(theirs, x, x, 10 + i)
        assert torch.equal(got[1], expected[1])
        for a, b in zip(got[:1] + got[2:], expected[:1] + expected[2:]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        for key, value in theirs.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-5)
