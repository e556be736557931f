"""Shared by test_vqgan.py and test_llamagen.py: key tables written out by hand, the
tokenizers' forward written from checkpoint keys alone (the spec the modules are held
to), seeded construction and twin comparison."""
import torch
import torch.nn.functional as F

# --- expected state-dict entries, block by block: {key: shape} ---------------------------

def conv(prefix, cin, cout, k):
    return {f"{prefix}.weight": (cout, cin, k, k), f"{prefix}.bias": (cout,)}


def norm(prefix, c):
    return {f"{prefix}.weight": (c,), f"{prefix}.bias": (c,)}


def resnet(prefix, cin, cout):
    keys = {**norm(f"{prefix}.norm1", cin), **conv(f"{prefix}.conv1", cin, cout, 3),
            **norm(f"{prefix}.norm2", cout), **conv(f"{prefix}.conv2", cout, cout, 3)}
    return keys | (conv(f"{prefix}.nin_shortcut", cin, cout, 1) if cin != cout else {})


def attn(prefix, c):
    return {**norm(f"{prefix}.norm", c),
            **{key: shape for name in ("q", "k", "v", "proj_out")
               for key, shape in conv(f"{prefix}.{name}", c, c, 1).items()}}


def table(*entries):
    """Merged entries; a block given as (builder, prefix, *channels) expands by its builder."""
    out = {}
    for builder, *args in entries:
        out.update(builder(*args))
    return out


def shapes(module):
    return {key: tuple(value.shape) for key, value in module.state_dict().items()}


# --- the spec: taming's forward, reading the weights by their checkpoint keys --------------

def _conv(sd, prefix, x, stride=1):
    weight = sd[f"{prefix}.weight"]
    padding = weight.shape[-1] // 2 if stride == 1 else 0
    return F.conv2d(x, weight, sd[f"{prefix}.bias"], stride=stride, padding=padding)


def _swish_norm(sd, prefix, x):
    h = F.group_norm(x, 32, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-6)
    return h * torch.sigmoid(h)


def _resnet(sd, prefix, x):
    h = _conv(sd, f"{prefix}.conv1", _swish_norm(sd, f"{prefix}.norm1", x))
    h = _conv(sd, f"{prefix}.conv2", _swish_norm(sd, f"{prefix}.norm2", h))
    if f"{prefix}.nin_shortcut.weight" in sd:
        x = _conv(sd, f"{prefix}.nin_shortcut", x)
    return x + h


def _attn(sd, prefix, x):
    """taming's AttnBlock: bmm over (B, C, H*W) with an explicit softmax."""
    b, c, height, width = x.shape
    h = F.group_norm(x, 32, sd[f"{prefix}.norm.weight"], sd[f"{prefix}.norm.bias"], eps=1e-6)
    q, k, v = (_conv(sd, f"{prefix}.{name}", h).reshape(b, c, -1) for name in "qkv")
    weights = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + _conv(sd, f"{prefix}.proj_out", out)


def _level(sd, prefix, blocks, h):
    j = 0
    while f"{prefix}.{blocks}.{j}.conv1.weight" in sd:
        h = _resnet(sd, f"{prefix}.{blocks}.{j}", h)
        if f"{prefix}.attn.{j}.q.weight" in sd:
            h = _attn(sd, f"{prefix}.attn.{j}", h)
        j += 1
    if f"{prefix}.downsample.conv.weight" in sd:
        h = _conv(sd, f"{prefix}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2)
    if f"{prefix}.upsample.conv.weight" in sd:
        h = _conv(sd, f"{prefix}.upsample.conv", F.interpolate(h, scale_factor=2.0))
    return h


def _mid(sd, prefix, names, h):
    block_1, attn_1, block_2 = (f"{prefix}.{name}" for name in names)
    return _resnet(sd, block_2, _attn(sd, attn_1, _resnet(sd, block_1, h)))


def _num_levels(sd, prefix):
    return len({key[len(prefix) + 1:].split(".")[0] for key in sd if key.startswith(prefix + ".")})


def encoder_spec(sd, x, levels, blocks, mid):
    """conv_in, ``encoder.{levels}.{0, 1, ...}``, mid, norm_out, swish, conv_out."""
    h = _conv(sd, "encoder.conv_in", x)
    for i in range(_num_levels(sd, f"encoder.{levels}")):
        h = _level(sd, f"encoder.{levels}.{i}", blocks, h)
    h = _mid(sd, "encoder.mid", mid, h)
    return _conv(sd, "encoder.conv_out", _swish_norm(sd, "encoder.norm_out", h))


def decoder_spec(sd, z, levels, blocks, mid, last_level_first):
    """conv_in, mid, ``decoder.{levels}.*`` (from the highest index with
    ``last_level_first``, as taming runs ``up``), norm_out, swish, conv_out."""
    h = _mid(sd, "decoder.mid", mid, _conv(sd, "decoder.conv_in", z))
    order = range(_num_levels(sd, f"decoder.{levels}"))
    for i in (reversed(order) if last_level_first else order):
        h = _level(sd, f"decoder.{levels}.{i}", blocks, h)
    return _conv(sd, "decoder.conv_out", _swish_norm(sd, "decoder.norm_out", h))


# --- construction and comparison ------------------------------------------------------------

def seeded(generator, build):
    """``build()`` with torch's default init drawn from a seed of ``generator`` (so the
    printed seed reproduces the weights) and a N(0, 1) codebook."""
    with torch.random.fork_rng():
        torch.manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        model = build()
    with torch.no_grad():
        weight = model.quantize.embedding.weight
        weight.copy_(torch.randn(weight.shape, generator=generator))
    return model


def twin_of(model, twin_class, *args, **kwargs):
    twin = twin_class(*args, **kwargs)
    twin.load_state_dict(model.state_dict())
    return twin


def run_with_grads(model, x, upstream):
    """Forward, ``(xrec * upstream).sum() + qloss`` backward; -> outputs and every gradient."""
    model.zero_grad()
    x = x.clone().requires_grad_()
    xrec, qloss = model(x)
    ((xrec * upstream).sum() + qloss).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    return xrec.detach(), qloss.detach(), x.grad, grads


def assert_twins_agree(model, twin, x, upstream, rtol=1e-4):
    """Same codes; reconstruction, loss, input and parameter gradients within ``rtol`` of
    their tensor's largest entry (the parameter gradients: of the largest of them all,
    since some are zero but for rounding, e.g. of k's bias or of a bias before a GroupNorm
    of one channel per group)."""
    codes, twin_codes = model.tokenize(x), twin.tokenize(x)
    assert torch.equal(codes, twin_codes), f"codes differ at {(codes != twin_codes).nonzero()}"
    got, expected = run_with_grads(model, x, upstream), run_with_grads(twin, x, upstream)
    for what, a, b in (("xrec", got[0], expected[0]), ("qloss", got[1], expected[1]),
                       ("grad x", got[2], expected[2])):
        _assert_close_to_scale(a, b, what, rtol, b.abs().max())
    assert got[3].keys() == expected[3].keys()
    scale = max(grad.abs().max() for grad in expected[3].values())
    for name, grad in got[3].items():
        assert grad is not None, f"no gradient reached {name}"
        _assert_close_to_scale(grad, expected[3][name], f"grad {name}", rtol, scale)


def _assert_close_to_scale(actual, expected, what, rtol, scale):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(scale),
                               msg=lambda m: f"{what}: {m}")
