"""vqkernels.models.VQGAN: taming's VQModel layout, its forward, its twin and its checkpoints."""
import pytest
import torch
from tokenizer_tools import (assert_twins_agree, attn, conv, decoder_spec, encoder_spec, norm,
                             resnet, seeded, shapes, table, twin_of)

from vqkernels.models import VQGAN, ReferenceVQGAN

SMALL = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32,
             ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), dropout=0.0)
SMALL_CODES, SMALL_EMBED = 32, 8


def taming_f16(n_embed):
    """taming's vqgan_imagenet_f16_{1024,16384} state dict, written out by hand."""
    return table(
        (conv, "encoder.conv_in", 3, 128, 3),
        (resnet, "encoder.down.0.block.0", 128, 128),
        (resnet, "encoder.down.0.block.1", 128, 128),
        (conv, "encoder.down.0.downsample.conv", 128, 128, 3),
        (resnet, "encoder.down.1.block.0", 128, 128),
        (resnet, "encoder.down.1.block.1", 128, 128),
        (conv, "encoder.down.1.downsample.conv", 128, 128, 3),
        (resnet, "encoder.down.2.block.0", 128, 256),
        (resnet, "encoder.down.2.block.1", 256, 256),
        (conv, "encoder.down.2.downsample.conv", 256, 256, 3),
        (resnet, "encoder.down.3.block.0", 256, 256),
        (resnet, "encoder.down.3.block.1", 256, 256),
        (conv, "encoder.down.3.downsample.conv", 256, 256, 3),
        (resnet, "encoder.down.4.block.0", 256, 512),
        (resnet, "encoder.down.4.block.1", 512, 512),
        (attn, "encoder.down.4.attn.0", 512), (attn, "encoder.down.4.attn.1", 512),
        (resnet, "encoder.mid.block_1", 512, 512), (attn, "encoder.mid.attn_1", 512),
        (resnet, "encoder.mid.block_2", 512, 512),
        (norm, "encoder.norm_out", 512), (conv, "encoder.conv_out", 512, 256, 3),
        (conv, "decoder.conv_in", 256, 512, 3),
        (resnet, "decoder.mid.block_1", 512, 512), (attn, "decoder.mid.attn_1", 512),
        (resnet, "decoder.mid.block_2", 512, 512),
        (resnet, "decoder.up.4.block.0", 512, 512), (resnet, "decoder.up.4.block.1", 512, 512),
        (resnet, "decoder.up.4.block.2", 512, 512),
        (attn, "decoder.up.4.attn.0", 512), (attn, "decoder.up.4.attn.1", 512),
        (attn, "decoder.up.4.attn.2", 512), (conv, "decoder.up.4.upsample.conv", 512, 512, 3),
        (resnet, "decoder.up.3.block.0", 512, 256), (resnet, "decoder.up.3.block.1", 256, 256),
        (resnet, "decoder.up.3.block.2", 256, 256),
        (conv, "decoder.up.3.upsample.conv", 256, 256, 3),
        (resnet, "decoder.up.2.block.0", 256, 256), (resnet, "decoder.up.2.block.1", 256, 256),
        (resnet, "decoder.up.2.block.2", 256, 256),
        (conv, "decoder.up.2.upsample.conv", 256, 256, 3),
        (resnet, "decoder.up.1.block.0", 256, 128), (resnet, "decoder.up.1.block.1", 128, 128),
        (resnet, "decoder.up.1.block.2", 128, 128),
        (conv, "decoder.up.1.upsample.conv", 128, 128, 3),
        (resnet, "decoder.up.0.block.0", 128, 128), (resnet, "decoder.up.0.block.1", 128, 128),
        (resnet, "decoder.up.0.block.2", 128, 128),
        (norm, "decoder.norm_out", 128), (conv, "decoder.conv_out", 128, 3, 3),
        (conv, "quant_conv", 256, 256, 1), (conv, "post_quant_conv", 256, 256, 1),
        (lambda: {"quantize.embedding.weight": (n_embed, 256)},),
    )


def small_model(generator, **kwargs):
    return seeded(generator, lambda: VQGAN(SMALL, SMALL_CODES, SMALL_EMBED, **kwargs))


def images(generator, batch=2, size=16):
    return torch.randn(batch, 3, size, size, generator=generator)


def with_loss_entries(state, generator):
    return {**state, "loss.logvar": torch.zeros(()),
            "loss.perceptual_loss.net.slice1.0.weight": torch.randn(64, 3, 3, 3,
                                                                    generator=generator),
            "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=generator)}


@pytest.mark.parametrize("n_embed,numel", [(1024, 72_141_699), (16384, 76_073_859)])
def test_imagenet_f16_keys_and_shapes(n_embed, numel):
    with torch.device("meta"):
        model = VQGAN.imagenet_f16(n_embed)
    expected = taming_f16(n_embed)
    assert shapes(model) == expected
    assert sum(p.numel() for p in model.state_dict().values()) == numel
    assert model.quantize.beta == 0.25 and model.downsample_factor == 16


def test_forward_follows_taming(generator):
    model = small_model(generator).eval()
    sd, x = model.state_dict(), images(generator)
    z = torch.randn(2, 8, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), encoder_spec(
            sd, x, "down", "block", ("block_1", "attn_1", "block_2")), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decoder(z), decoder_spec(
            sd, z, "up", "block", ("block_1", "attn_1", "block_2"), last_level_first=True),
            rtol=1e-4, atol=1e-5)


def test_matches_twin(generator):
    model = small_model(generator)
    twin = twin_of(model, ReferenceVQGAN, SMALL, SMALL_CODES, SMALL_EMBED)
    x = images(generator)
    assert_twins_agree(model, twin, x, torch.randn(x.shape, generator=generator))


def test_decode_matches_twin(generator):
    model = small_model(generator)
    twin = twin_of(model, ReferenceVQGAN, SMALL, SMALL_CODES, SMALL_EMBED)
    quant = torch.randn(3, SMALL_EMBED, 4, 6, generator=generator)
    torch.testing.assert_close(model.decode(quant), twin.decode(quant), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sane_index_shape", [False, True])
def test_encode_tokenize_decode_code(sane_index_shape, generator):
    model = small_model(generator, sane_index_shape=sane_index_shape).eval()
    x = images(generator, batch=3, size=32)
    quant, emb_loss, (perplexity, min_encodings, indices) = model.encode(x)
    assert quant.shape == (3, SMALL_EMBED, 16, 16) and emb_loss.shape == ()
    assert perplexity is None and min_encodings is None
    assert indices.shape == ((3, 16, 16) if sane_index_shape else (3 * 16 * 16,))
    tokens = model.tokenize(x)
    assert tokens.shape == (3, 16, 16) and tokens.dtype == torch.int64
    assert torch.equal(tokens.flatten(), indices.flatten())
    xrec = model.decode(quant)
    assert xrec.shape == x.shape
    torch.testing.assert_close(model.decode_code(tokens), xrec, rtol=1e-5, atol=1e-5)
    forward_rec, qloss = model(x)
    torch.testing.assert_close(forward_rec, xrec)
    torch.testing.assert_close(qloss, emb_loss)


def test_load_taming_checkpoint_drops_loss_entries(tmp_path, generator):
    saved, loaded = small_model(generator), small_model(generator)
    state = with_loss_entries(saved.state_dict(), generator)
    for name, checkpoint in (("lightning", {"state_dict": state, "epoch": 3, "global_step": 7}),
                             ("bare", state)):
        path = tmp_path / f"{name}.ckpt"
        torch.save(checkpoint, path)
        assert loaded.load_taming_checkpoint(path) is loaded
        for key, value in saved.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_preset_loads_its_checkpoint_strictly(tmp_path, generator):
    """The full preset against the hand-made table (meta tensors: shapes only, no data)."""
    state = {key: torch.empty(shape, device="meta") for key, shape in taming_f16(16384).items()}
    state = with_loss_entries(state, generator)
    with torch.device("meta"):
        model = VQGAN.imagenet_f16(16384)
    torch.save({"state_dict": state}, tmp_path / "full.ckpt")
    model.load_taming_checkpoint(tmp_path / "full.ckpt")
    del state["decoder.up.4.attn.2.proj_out.bias"]
    torch.save({"state_dict": {**state, "encoder.extra": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(RuntimeError, match="(?s)Missing key.*proj_out.bias.*Unexpected key.*extra"):
        model.load_taming_checkpoint(tmp_path / "bad.ckpt")


def test_checkpoint_that_is_not_a_state_dict(tmp_path):
    torch.save({"epoch": 3, "optimizer_states": []}, tmp_path / "odd.ckpt")
    with torch.device("meta"):
        model = VQGAN.imagenet_f16(1024)
    with pytest.raises(ValueError, match="state_dict"):
        model.load_taming_checkpoint(tmp_path / "odd.ckpt")


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m.encode(torch.zeros(1, 4, 16, 16)), ValueError, r"x must be .*\(B, 3, H, W\)"),
    (lambda m: m.encode(torch.zeros(1, 3, 16, 15)), ValueError, "x must be .*multiples of 2"),
    (lambda m: m.tokenize(torch.zeros(3, 16, 16)), ValueError, "x must be"),
    (lambda m: m(torch.zeros(1, 3, 16, 16, dtype=torch.int64)), ValueError, "x must be float"),
    (lambda m: m.decode(torch.zeros(1, 7, 8, 8)), ValueError, r"quant must be \(B, 8, h, w\)"),
    (lambda m: m.decode_code(torch.zeros(1, 8, 8)), TypeError, "indices must be an int64"),
    (lambda m: m.decode_code(torch.zeros(1, 8, 8, dtype=torch.bool)), TypeError, "indices"),
    (lambda m: m.decode_code(torch.zeros(64, dtype=torch.int64)), ValueError,
     r"indices must be \(B, h, w\)"),
])
def test_bad_inputs_name_the_argument(call, error, match, generator):
    with pytest.raises(error, match=match):
        call(small_model(generator))


@pytest.mark.parametrize("ddconfig,match", [
    ({k: v for k, v in SMALL.items() if k != "ch_mult"}, r"missing keys \['ch_mult'\]"),
    ({**SMALL, "tanh_out": True}, r"unknown keys \['tanh_out'\]"),
    ({**SMALL, "double_z": True}, r"ddconfig\['double_z'\] must be False"),
    ({**SMALL, "resamp_with_conv": False}, r"ddconfig\['resamp_with_conv'\] must be True"),
])
def test_bad_ddconfig(ddconfig, match):
    with pytest.raises(ValueError, match=match):
        VQGAN(ddconfig, SMALL_CODES, SMALL_EMBED)


def test_imagenet_f16_code_counts():
    with pytest.raises(ValueError, match="n_embed must be 1024 or 16384"):
        VQGAN.imagenet_f16(512)
