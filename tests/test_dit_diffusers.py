"""models.dit_to_diffusers / dit_from_diffusers: the converted model gives the other's
output both ways (within the contract of diffusers' float64 output, its float32 output the
yardstick), the tensors map one to one, and what DiT cannot hold is refused. The kernels'
parity is test_dit_model.py's: these tests run the reference backend."""
import copy
import warnings

import pytest
import torch

DiTTransformer2DModel = pytest.importorskip("diffusers").DiTTransformer2DModel

from vqkernels.models import DiT, dit_from_diffusers, dit_to_diffusers
from vqkernels.testing import assert_within_contract

CONFIG = dict(num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8,
              num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=2, num_heads=4,
            num_classes=10, backend="reference")


def randomize_(model, generator):
    """Every learned parameter random; DiT's fixed pos_embed, which diffusers recomputes, kept."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "pos_embed":
                continue
            std = 0.1 if name.endswith("bias") else 0.2
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * std)
    return model


def random_diffusers_model(generator, **config):
    """Random weights, one set of embedders repeated in every block (as DiT's port has)."""
    model = randomize_(DiTTransformer2DModel(**{**CONFIG, **config}), generator)
    shared = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks:
        block.norm1.emb.load_state_dict(shared)
    return model.eval()


def random_inputs(generator, batch=3):
    x = torch.randn(batch, 4, 8, 8, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    y = torch.randint(0, 11, (batch,), generator=generator)  # the null class too
    return x, t, y


def assert_gives_diffusers_output(ours, theirs, generator):
    x, t, y = random_inputs(generator)
    with torch.no_grad():
        truth = copy.deepcopy(theirs).double()(x.double(), t, y).sample
        assert_within_contract("attention", torch.float32, ours(x, t, y), theirs(x, t, y).sample,
                               truth, what="DiT vs diffusers")


def test_from_diffusers_gives_diffusers_output(generator):
    theirs = random_diffusers_model(generator)  # norm_eps 1e-5, diffusers' default
    ours = dit_from_diffusers(theirs, backend="reference").eval()
    assert ours.t_embedder.downscale_freq_shift == 1
    assert [b.norm2.eps for b in ours.blocks] == [1e-5, 1e-5]
    assert ours.backend == "reference" and ours.learn_sigma and ours.num_classes == 10
    torch.testing.assert_close(ours.pos_embed, theirs.pos_embed.pos_embed, rtol=0, atol=1e-6)
    assert_gives_diffusers_output(ours, theirs, generator)


def test_to_diffusers_gives_dits_output(generator):
    ours = randomize_(DiT(**TINY, timestep_freq_shift=1, mlp_norm_eps=1e-5), generator).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theirs = dit_to_diffusers(ours).eval()
    assert {k: theirs.config[k] for k in [*CONFIG, "norm_eps"]} == {**CONFIG, "norm_eps": 1e-5}
    assert_gives_diffusers_output(ours, theirs, generator)


def test_round_trips_are_exact(generator):
    theirs = random_diffusers_model(generator).double()
    ours = dit_from_diffusers(theirs)
    assert ours.pos_embed.dtype == torch.float64
    again = dit_to_diffusers(ours)
    for name, value in theirs.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name
    back = dit_from_diffusers(again)
    for name, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


def test_to_diffusers_warns_that_its_timestep_frequencies_differ():
    with pytest.warns(UserWarning, match="downscale_freq_shift=1"):
        theirs = dit_to_diffusers(DiT(**TINY))
    assert theirs.config.norm_eps == 1e-6


@pytest.mark.parametrize("kwargs,match", [(dict(mlp_ratio=2.0), "mlp_ratio"),
                                          (dict(class_dropout_prob=0.0), "class_dropout_prob"),
                                          (dict(), "pos_embed")])
def test_to_diffusers_refuses_what_diffusers_cannot_hold(kwargs, match):
    model = DiT(**TINY, **kwargs, timestep_freq_shift=1)
    if match == "pos_embed":
        model.pos_embed.data[0, 1, 2] += 1e-3
    with pytest.raises(ValueError, match=match):
        dit_to_diffusers(model)


@pytest.mark.parametrize("config,match", [(dict(activation_fn="gelu"), "activation_fn"),
                                          (dict(out_channels=5), "out_channels")])
def test_from_diffusers_refuses_what_dit_cannot_hold(config, match, generator):
    with pytest.raises(ValueError, match=match):
        dit_from_diffusers(random_diffusers_model(generator, **config))


def test_from_diffusers_refuses_blocks_with_their_own_embedders(generator):
    theirs = random_diffusers_model(generator)
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.class_embedder.embedding_table.weight[0] += 1
    with pytest.raises(ValueError, match="differs between blocks"):
        dit_from_diffusers(theirs)
