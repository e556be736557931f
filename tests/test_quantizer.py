"""vqkernels.VectorQuantizer against its pure-PyTorch twin and taming's contract."""
import numpy as np
import pytest
import torch

import vqkernels
from vqkernels.nn import ReferenceVectorQuantizer, VectorQuantizer


def twins(generator, n_e=29, e_dim=6, **kwargs):
    fast = VectorQuantizer(n_e, e_dim, **kwargs)
    twin_kwargs = {k: v for k, v in kwargs.items() if k not in ("precision", "backend")}
    twin = ReferenceVectorQuantizer(n_e, e_dim, **twin_kwargs)
    weight = torch.randn(n_e, e_dim, generator=generator)
    fast.embedding.weight.data.copy_(weight)
    twin.embedding.weight.data.copy_(weight)
    return fast, twin


def run(module, z, upstream):
    z = z.clone().requires_grad_()
    z_q, loss, (perplexity, min_encodings, indices) = module(z)
    ((z_q * upstream).sum() + loss).backward()
    return z_q, loss, indices, z.grad, module.embedding.weight.grad, perplexity, min_encodings


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [True, False])
@pytest.mark.parametrize("beta", [0.25, 1.7])
def test_matches_twin(legacy, sane_index_shape, beta, generator):
    fast, twin = twins(generator, legacy=legacy, sane_index_shape=sane_index_shape, beta=beta)
    z = torch.randn(3, 6, 5, 7, generator=generator)
    upstream = torch.randn(z.shape, generator=generator)
    got, expected = run(fast, z, upstream), run(twin, z, upstream)
    assert got[5] is None and got[6] is None  # taming returns (None, None, indices)
    assert torch.equal(got[2], expected[2])
    assert got[2].shape == ((3, 5, 7) if sane_index_shape else (3 * 5 * 7,))
    for name, a, b in zip(("z_q", "loss", "grad z", "grad codebook"), got[:2] + got[3:5],
                          expected[:2] + expected[3:5]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_quantized_output_is_the_codes(generator):
    vq = VectorQuantizer(17, 4)
    z = torch.randn(2, 4, 3, 3, generator=generator)
    z_q, _, (_, _, indices) = vq(z)
    codes = vq.get_codebook_entry(indices, (2, 3, 3, 4))
    torch.testing.assert_close(z_q, codes)  # z + sg(zq - z): the codes up to one rounding


def test_cosine_codebook_entries_are_the_unit_codes_forward_returns(generator):
    vq = VectorQuantizer(17, 4, metric="cosine")
    vq.embedding.weight.data.copy_(3 * torch.randn(17, 4, generator=generator))
    z_q, _, (_, _, indices) = vq(torch.randn(2, 4, 3, 3, generator=generator))
    torch.testing.assert_close(vq.get_codebook_entry(indices, (2, 3, 3, 4)), z_q)


@pytest.mark.parametrize("unknown_index", ["random", "extra", 3])
def test_remap_matches_twin(unknown_index, tmp_path, generator):
    used = np.array([0, 4, 5, 9, 11, 20], dtype=np.int64)
    path = tmp_path / "used.npy"
    np.save(path, used)
    fast, twin = twins(generator, remap=str(path), unknown_index=unknown_index)
    z = torch.randn(2, 6, 4, 4, generator=generator)
    torch.manual_seed(0)
    _, _, (_, _, got) = fast(z)
    torch.manual_seed(0)
    _, _, (_, _, expected) = twin(z)
    assert got.shape == (2 * 16, 1) and torch.equal(got, expected)
    raw = fast.embedding.weight  # positions of used codes map back to those codes
    back = fast.unmap_to_all(torch.arange(len(used)).reshape(1, -1))
    assert back.flatten().tolist() == used.tolist()
    if unknown_index == "extra":
        assert fast.re_embed == len(used) + 1
    assert raw.shape == (29, 6)


def test_state_dict_round_trip(tmp_path, generator):
    np.save(tmp_path / "used.npy", np.arange(0, 29, 3))
    fast, twin = twins(generator, remap=str(tmp_path / "used.npy"))
    assert set(fast.state_dict()) == {"embedding.weight", "used"}
    other = VectorQuantizer(29, 6, remap=str(tmp_path / "used.npy"))
    other.load_state_dict(twin.state_dict())
    assert torch.equal(other.embedding.weight, twin.embedding.weight)
    twin.load_state_dict(fast.state_dict())


def test_embedding_init_is_taming_uniform():
    weight = VectorQuantizer(512, 8).embedding.weight
    assert weight.abs().max() <= 1 / 512 and weight.std() > 0


def test_channel_last_and_cosine(generator):
    fast, twin = twins(generator, channel_last=True, metric="cosine")
    z = torch.randn(2, 3, 5, 6, generator=generator)
    upstream = torch.randn(z.shape, generator=generator)
    got, expected = run(fast, z, upstream), run(twin, z, upstream)
    assert torch.equal(got[2], expected[2])
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[3], expected[3], rtol=1e-5, atol=1e-6)


def test_code_usage_and_perplexity(generator):
    vq = VectorQuantizer(8, 2, compute_perplexity=True)
    indices = torch.tensor([0, 0, 1, 3])
    usage = vq.code_usage(indices)
    assert usage["counts"].tolist() == [2, 1, 0, 1, 0, 0, 0, 0] and usage["dead"].item() == 5
    p = torch.tensor([0.5, 0.25, 0.25])
    torch.testing.assert_close(usage["perplexity"], torch.exp(-(p * p.log()).sum()))
    _, _, (perplexity, _, _) = vq(torch.randn(1, 2, 3, 3, generator=generator))
    assert perplexity.ndim == 0 and 1 <= perplexity.item() <= 8


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(temp=0.5), ValueError, "temp"),
    (dict(rescale_logits=True), ValueError, "rescale_logits"),
])
def test_taming_only_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        VectorQuantizer(4, 2)(torch.randn(1, 2, 2, 2), **kwargs)


def test_wrong_input_shape_names_the_problem():
    with pytest.raises(ValueError, match="4-D"):
        VectorQuantizer(4, 2)(torch.randn(3, 2))
    with pytest.raises(ValueError, match="e_dim"):
        VectorQuantizer(4, 2)(torch.randn(1, 3, 2, 2))


def test_top_level_export():
    assert vqkernels.VectorQuantizer is VectorQuantizer
