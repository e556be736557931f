"""vqkernels.models.LlamaGenVQ: LlamaGen's VQ-16 layout, forward, codebook, twin, checkpoints."""
import pytest
import torch
import torch.nn.functional as F
from tokenizer_tools import (assert_twins_agree, attn, conv, decoder_spec, encoder_spec, norm,
                             resnet, seeded, shapes, table, twin_of)

from vqkernels.models import LlamaGenVQ, ReferenceLlamaGenVQ

SMALL = dict(encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), z_channels=8, ch=32,
             num_res_blocks=1)
SMALL_CODES, SMALL_EMBED = 32, 8
MID = ("0", "1", "2")


def vq_16():
    """LlamaGen's VQ_16 state dict, written out by hand."""
    return table(
        (conv, "encoder.conv_in", 3, 128, 3),
        (resnet, "encoder.conv_blocks.0.res.0", 128, 128),
        (resnet, "encoder.conv_blocks.0.res.1", 128, 128),
        (conv, "encoder.conv_blocks.0.downsample.conv", 128, 128, 3),
        (resnet, "encoder.conv_blocks.1.res.0", 128, 128),
        (resnet, "encoder.conv_blocks.1.res.1", 128, 128),
        (conv, "encoder.conv_blocks.1.downsample.conv", 128, 128, 3),
        (resnet, "encoder.conv_blocks.2.res.0", 128, 256),
        (resnet, "encoder.conv_blocks.2.res.1", 256, 256),
        (conv, "encoder.conv_blocks.2.downsample.conv", 256, 256, 3),
        (resnet, "encoder.conv_blocks.3.res.0", 256, 256),
        (resnet, "encoder.conv_blocks.3.res.1", 256, 256),
        (conv, "encoder.conv_blocks.3.downsample.conv", 256, 256, 3),
        (resnet, "encoder.conv_blocks.4.res.0", 256, 512),
        (resnet, "encoder.conv_blocks.4.res.1", 512, 512),
        (attn, "encoder.conv_blocks.4.attn.0", 512), (attn, "encoder.conv_blocks.4.attn.1", 512),
        (resnet, "encoder.mid.0", 512, 512), (attn, "encoder.mid.1", 512),
        (resnet, "encoder.mid.2", 512, 512),
        (norm, "encoder.norm_out", 512), (conv, "encoder.conv_out", 512, 256, 3),
        (conv, "decoder.conv_in", 256, 512, 3),
        (resnet, "decoder.mid.0", 512, 512), (attn, "decoder.mid.1", 512),
        (resnet, "decoder.mid.2", 512, 512),
        (resnet, "decoder.conv_blocks.0.res.0", 512, 512),
        (resnet, "decoder.conv_blocks.0.res.1", 512, 512),
        (resnet, "decoder.conv_blocks.0.res.2", 512, 512),
        (attn, "decoder.conv_blocks.0.attn.0", 512), (attn, "decoder.conv_blocks.0.attn.1", 512),
        (attn, "decoder.conv_blocks.0.attn.2", 512),
        (conv, "decoder.conv_blocks.0.upsample.conv", 512, 512, 3),
        (resnet, "decoder.conv_blocks.1.res.0", 512, 256),
        (resnet, "decoder.conv_blocks.1.res.1", 256, 256),
        (resnet, "decoder.conv_blocks.1.res.2", 256, 256),
        (conv, "decoder.conv_blocks.1.upsample.conv", 256, 256, 3),
        (resnet, "decoder.conv_blocks.2.res.0", 256, 256),
        (resnet, "decoder.conv_blocks.2.res.1", 256, 256),
        (resnet, "decoder.conv_blocks.2.res.2", 256, 256),
        (conv, "decoder.conv_blocks.2.upsample.conv", 256, 256, 3),
        (resnet, "decoder.conv_blocks.3.res.0", 256, 128),
        (resnet, "decoder.conv_blocks.3.res.1", 128, 128),
        (resnet, "decoder.conv_blocks.3.res.2", 128, 128),
        (conv, "decoder.conv_blocks.3.upsample.conv", 128, 128, 3),
        (resnet, "decoder.conv_blocks.4.res.0", 128, 128),
        (resnet, "decoder.conv_blocks.4.res.1", 128, 128),
        (resnet, "decoder.conv_blocks.4.res.2", 128, 128),
        (norm, "decoder.norm_out", 128), (conv, "decoder.conv_out", 128, 3, 3),
        (conv, "quant_conv", 256, 8, 1), (conv, "post_quant_conv", 8, 256, 1),
        (lambda: {"quantize.embedding.weight": (16384, 8), "quantize.codebook_used": (65536,)},),
    )


def small_model(generator, **kwargs):
    return seeded(generator, lambda: LlamaGenVQ(SMALL_CODES, SMALL_EMBED, **SMALL, **kwargs))


def images(generator, batch=2, size=16):
    return torch.randn(batch, 3, size, size, generator=generator)


def test_vq_16_keys_and_shapes():
    with torch.device("meta"):
        models = LlamaGenVQ.vq_16(), LlamaGenVQ()
    for model in models:
        assert shapes(model) == vq_16()
        assert sum(p.numel() for p in model.parameters()) == 71_883_403  # "72M" in LlamaGen's table
        assert model.quantize.metric == "cosine" and model.downsample_factor == 16


def test_forward_follows_llamagen(generator):
    model = small_model(generator).eval()
    sd, x = model.state_dict(), images(generator)
    z = torch.randn(2, 8, 8, 8, generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(model.encoder(x), encoder_spec(sd, x, "conv_blocks", "res", MID),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(model.decoder(z), decoder_spec(
            sd, z, "conv_blocks", "res", MID, last_level_first=False), rtol=1e-4, atol=1e-5)


def test_matches_twin(generator):
    model = small_model(generator)
    twin = twin_of(model, ReferenceLlamaGenVQ, SMALL_CODES, SMALL_EMBED, **SMALL)
    x = images(generator)
    assert_twins_agree(model, twin, x, torch.randn(x.shape, generator=generator))
    assert torch.equal(model.quantize.codebook_used, twin.quantize.codebook_used)


def test_convolutions_run_channels_last_and_the_twin_nchw(generator):
    model = small_model(generator)
    twin = twin_of(model, ReferenceLlamaGenVQ, SMALL_CODES, SMALL_EMBED, **SMALL)
    last, first = torch.channels_last, torch.contiguous_format
    for module, layout in ((model, last), (twin, first)):
        weights = [p for p in module.parameters() if p.dim() == 4]
        assert weights and all(w.is_contiguous(memory_format=layout) for w in weights)
    restored = small_model(generator)
    restored.load_state_dict(twin.state_dict())  # an NCHW checkpoint keeps the model NHWC
    assert restored.encoder.conv_in.weight.is_contiguous(memory_format=last)
    with torch.no_grad():
        xrec, _ = model(images(generator))
    assert xrec.is_contiguous()  # images come back in the usual layout


def test_quantizer_is_llamagens(generator):
    """Unit-norm codes by the cosine search; loss mse(zq, sg z) + beta mse(sg zq, z), unit z."""
    model = small_model(generator, commit_loss_beta=0.4).eval()
    x = images(generator)
    h = model.quant_conv(model.encoder(x))
    quant, loss, (_, _, indices) = model.encode(x)
    z = F.normalize(h.permute(0, 2, 3, 1).reshape(-1, SMALL_EMBED), dim=1)
    codes = F.normalize(model.quantize.embedding.weight, dim=1)
    assert torch.equal(indices, (z @ codes.T).argmax(1))
    torch.testing.assert_close(quant.permute(0, 2, 3, 1).reshape(-1, SMALL_EMBED), codes[indices])
    torch.testing.assert_close(loss, 1.4 * (codes[indices] - z).square().mean())


def test_codebook_used_keeps_the_latest_indices_in_training(generator):
    model = small_model(generator)
    used = model.quantize.codebook_used
    assert used.shape == (65536,) and not used.any()
    first, second = model.tokenize(images(generator)), model.tokenize(images(generator))
    assert torch.equal(used[-256:], torch.cat([first.flatten(), second.flatten()]).float())
    model.eval()
    model.tokenize(images(generator))
    assert torch.equal(used[-128:], second.flatten().float())


def test_without_usage_or_l2_norm():
    with torch.device("meta"):
        model = LlamaGenVQ(codebook_show_usage=False, codebook_l2_norm=False)
    assert "quantize.codebook_used" not in model.state_dict()
    assert model.quantize.metric == "l2"


def test_encode_tokenize_decode_code(generator):
    model = small_model(generator).eval()
    x = images(generator, batch=3, size=32)
    quant, emb_loss, (_, _, indices) = model.encode(x)
    assert quant.shape == (3, SMALL_EMBED, 16, 16) and emb_loss.shape == ()
    tokens = model.tokenize(x)
    assert tokens.shape == (3, 16, 16) and torch.equal(tokens.flatten(), indices)
    xrec = model.decode(quant)
    assert xrec.shape == x.shape
    torch.testing.assert_close(model.decode_code(tokens), xrec, rtol=1e-5, atol=1e-5)
    llamagen_call = model.decode_code(indices, [3, SMALL_EMBED, 16, 16])  # as its samplers do
    torch.testing.assert_close(llamagen_call, xrec, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("wrapper", ["model", "ema", "state_dict", None])
def test_loads_every_checkpoint_format(wrapper, tmp_path, generator):
    saved, loaded = small_model(generator), small_model(generator)
    state = saved.state_dict()
    checkpoint = state if wrapper is None else {wrapper: state, "steps": 10}
    torch.save(checkpoint, tmp_path / "vq.pt")
    assert loaded.load_checkpoint(tmp_path / "vq.pt") is loaded
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_prefers_ema_unless_told(tmp_path, generator):
    ema, model = small_model(generator).state_dict(), small_model(generator).state_dict()
    torch.save({"model": model, "ema": ema}, tmp_path / "train.pt")
    loaded = small_model(generator).load_checkpoint(tmp_path / "train.pt")
    assert torch.equal(loaded.encoder.conv_in.weight, ema["encoder.conv_in.weight"])
    loaded.load_checkpoint(tmp_path / "train.pt", key="model")
    assert torch.equal(loaded.encoder.conv_in.weight, model["encoder.conv_in.weight"])


def test_vq_16_loads_its_checkpoint_strictly(tmp_path):
    """The full preset against the hand-made table (meta tensors: shapes only, no data)."""
    state = {key: torch.empty(shape, device="meta") for key, shape in vq_16().items()}
    with torch.device("meta"):
        model = LlamaGenVQ.vq_16()
    torch.save({"model": state}, tmp_path / "vq_ds16_c2i.pt")
    model.load_checkpoint(tmp_path / "vq_ds16_c2i.pt")
    del state["quantize.codebook_used"]
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="Missing key.*codebook_used"):
        model.load_checkpoint(tmp_path / "bad.pt")


@pytest.mark.parametrize("call,error,match", [
    (lambda m: m.encode(torch.zeros(1, 1, 16, 16)), ValueError, r"x must be .*\(B, 3, H, W\)"),
    (lambda m: m.encode(torch.zeros(1, 3, 9, 16)), ValueError, "x must be .*multiples of 2"),
    (lambda m: m.decode(torch.zeros(1, 256, 8, 8)), ValueError, r"quant must be \(B, 8, h, w\)"),
    (lambda m: m.decode_code(torch.zeros(1, 8, 8)), TypeError, "indices"),
])
def test_bad_inputs_name_the_argument(call, error, match, generator):
    with pytest.raises(error, match=match):
        call(small_model(generator))


def test_encoder_and_decoder_must_match():
    with pytest.raises(ValueError, match="decoder_ch_mult must have one length.*got 2 and 3"):
        LlamaGenVQ(32, 8, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 1, 2), ch=32)
