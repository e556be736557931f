"""models.DiT: the release's state dict, presets, sin-cos table, initialization and label
dropout; parity of output and every gradient with ReferenceDiT per backend; classifier-free
guidance; checkpoints; torch.compile, DDP (2 gloo ranks) and DDIM sampling (a CUDA graph on
a GPU); argument validation."""
import argparse
import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vqkernels import ops
from vqkernels.models import DiT, DiT_models, ReferenceDiT, load_dit_checkpoint
from vqkernels.models.dit import LabelEmbedder, sincos_pos_embed_2d
from vqkernels.sampling import DDIMSampler, DDIMScheduler
from vqkernels.testing import assert_within_contract

F32, F64 = torch.float32, torch.float64
TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=24, depth=2, num_heads=2,
            num_classes=10)
# The interpreter runs the adaLN kernels row by row: a 2 x 2 grid of patches keeps it fast.
INTERP_SIZE = dict(TINY, input_size=4)
BACKENDS = [  # every one runs on CPU tensors
    pytest.param("reference", id="reference"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton-interp", marks=pytest.mark.interpreter),
]


def randomize_(model, generator):
    """Every parameter random (the zero-initialized adaLN and head included), pos_embed too."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 if name.endswith("bias") else 0.2
            p.copy_((torch.randn(p.shape, generator=generator, dtype=F64) * std).to(p.dtype))
    return model


def random_inputs(model, batch, generator, *, max_t=1000):
    size = model.grid_size * model.patch_size
    x = torch.randn(batch, model.in_channels, size, size, generator=generator)
    t = torch.randint(0, max_t, (batch,), generator=generator)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=generator)  # null class too
    return x, t, y


def shapes(model):
    return [(name, tuple(v.shape)) for name, v in model.state_dict().items()]


# --------------------------------------------------------------------------- the release's layout

def test_state_dict_is_the_releases():
    d, mlp, out = 24, 96, 2 * 2 * 8
    block = [("attn.qkv.weight", (3 * d, d)), ("attn.qkv.bias", (3 * d,)),
             ("attn.proj.weight", (d, d)), ("attn.proj.bias", (d,)),
             ("mlp.fc1.weight", (mlp, d)), ("mlp.fc1.bias", (mlp,)),
             ("mlp.fc2.weight", (d, mlp)), ("mlp.fc2.bias", (d,)),
             ("adaLN_modulation.1.weight", (6 * d, d)), ("adaLN_modulation.1.bias", (6 * d,))]
    expected = [
        ("pos_embed", (1, 16, d)),
        ("x_embedder.proj.weight", (d, 4, 2, 2)), ("x_embedder.proj.bias", (d,)),
        ("t_embedder.mlp.0.weight", (d, 256)), ("t_embedder.mlp.0.bias", (d,)),
        ("t_embedder.mlp.2.weight", (d, d)), ("t_embedder.mlp.2.bias", (d,)),
        ("y_embedder.embedding_table.weight", (11, d)),
        *[(f"blocks.{i}.{name}", shape) for i in range(2) for name, shape in block],
        ("final_layer.linear.weight", (out, d)), ("final_layer.linear.bias", (out,)),
        ("final_layer.adaLN_modulation.1.weight", (2 * d, d)),
        ("final_layer.adaLN_modulation.1.bias", (2 * d,)),
    ]
    with torch.device("meta"):
        models = DiT(**TINY), ReferenceDiT(**TINY)
    for model in models:
        assert shapes(model) == expected
        assert not model.pos_embed.requires_grad
        assert {b.norm1.eps for b in model.blocks} == {b.norm2.eps for b in model.blocks} == {1e-6}


def test_dit_xl_2_has_the_releases_size_and_the_presets_their_dims():
    with torch.device("meta"):
        xl = DiT_models["DiT-XL/2"]()
        assert sum(v.numel() for v in xl.state_dict().values()) == 675_129_632
        assert xl.out_channels == 8 and xl.num_classes == 1000 and xl.grid_size == 16
        dims = {"XL": (28, 1152, 16), "L": (24, 1024, 16), "B": (12, 768, 12), "S": (12, 384, 6)}
        assert list(DiT_models) == [f"DiT-{n}/{p}" for n in dims for p in (2, 4, 8)]
        for name, build in DiT_models.items():
            model = build(input_size=64, learn_sigma=False)
            depth, hidden, heads = dims[name[4:-2]]
            patch = int(name[-1])
            assert (len(model.blocks), model.pos_embed.shape, model.num_heads) == (
                depth, (1, (64 // patch) ** 2, hidden), heads)
            assert model.x_embedder.proj.kernel_size == (patch, patch) and model.out_channels == 4


def test_pos_embed_is_maes_table():
    """Channel k < D/4: sin(column * w_k), then cos(column * w_k), then the same for the row."""
    d, grid = 16, 3
    model = DiT(input_size=6, patch_size=2, hidden_size=d, num_heads=2, depth=1, num_classes=3)
    table = model.pos_embed[0]
    assert model.pos_embed.dtype == F32 and "pos_embed" in model.state_dict()
    for token in range(grid * grid):
        row, column = divmod(token, grid)
        for k in range(d // 4):
            w = 1 / 10000 ** (k / (d / 4))
            want = [f(position * w) for position in (column, row) for f in (math.sin, math.cos)]
            got = [table[token, k + j * d // 4].item() for j in range(4)]
            assert got == pytest.approx(want, abs=1e-7), (token, k)
    assert torch.equal(table, sincos_pos_embed_2d(d, grid).float())


def test_initialization_is_the_releases():
    model = DiT(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10,
                backend="reference")
    zeroed = {"final_layer.linear", "final_layer.adaLN_modulation.1",
              *(f"blocks.{i}.adaLN_modulation.1" for i in range(2))}
    normal = {"t_embedder.mlp.0", "t_embedder.mlp.2"}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert not module.bias.any(), name
            if name in zeroed:
                assert not module.weight.any(), name
            elif name in normal:
                assert module.weight.std().item() == pytest.approx(0.02, rel=0.15), name
            else:
                assert_xavier_uniform(module.weight, name)
    proj = model.x_embedder.proj
    assert_xavier_uniform(proj.weight.view(64, -1), "x_embedder.proj")  # fans of the Linear
    assert not proj.bias.any()
    assert model.y_embedder.embedding_table.weight.std().item() == pytest.approx(0.02, rel=0.15)
    assert torch.equal(model.pos_embed[0], sincos_pos_embed_2d(64, 4).float())
    x, t, y = random_inputs(model, 2, torch.Generator().manual_seed(0))
    assert not model.eval()(x, t, y).any(), "adaLN-Zero: the head starts at zero"


def assert_xavier_uniform(weight, name):
    bound = math.sqrt(6 / sum(weight.shape))
    # The bound is rounded to float32 before the uniform draw scales by it (one ulp above).
    assert weight.abs().max().item() <= bound * (1 + 2**-23), name
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1), name


# --------------------------------------------------------------------------- labels, patches

def test_label_dropout_is_the_releases():
    labels = torch.randint(0, 10, (64,))
    embedder = LabelEmbedder(10, 8, 0.5).train()
    torch.manual_seed(1)
    out = embedder(labels)
    torch.manual_seed(1)
    dropped = torch.where(torch.rand(64) < 0.5, 10, labels)
    assert torch.equal(out, embedder.embedding_table(dropped))
    force = torch.randint(0, 2, (64,))
    forced = torch.where(force == 1, 10, labels)
    for mode in (True, False):
        assert torch.equal(embedder.train(mode)(labels, force), embedder.embedding_table(forced))
    assert torch.equal(embedder.eval()(labels), embedder.embedding_table(labels))
    no_null = LabelEmbedder(10, 8, 0.0).train()
    assert no_null.embedding_table.num_embeddings == 10
    assert torch.equal(no_null(labels), no_null.embedding_table(labels))


def test_unpatchify_is_row_major_patches_of_channels_last_pixels():
    model = DiT(input_size=6, patch_size=2, in_channels=3, hidden_size=8, depth=1, num_heads=2,
                num_classes=2)
    p, g, c = 2, 3, 6
    tokens = torch.randn(2, g * g, p * p * c)
    images = model.unpatchify(tokens)
    assert images.shape == (2, c, g * p, g * p)
    for i, j, u, v, ch in [(0, 0, 0, 0, 0), (1, 2, 1, 0, 5), (2, 1, 0, 1, 3), (2, 2, 1, 1, 4)]:
        # patch (row i, column j), pixel (u, v) within it, channel ch
        pixel = images[:, ch, i * p + u, j * p + v]
        assert torch.equal(pixel, tokens[:, i * g + j, (u * p + v) * c + ch]), (i, j, u, v, ch)


# --------------------------------------------------------------------------- parity

def outputs_and_grads(model, x, t, y, grad_out):
    x = x.detach().requires_grad_()
    out = model(x, t, y)
    out.backward(grad_out)
    return {"out": out.detach(), "x": x.grad,
            **{name: p.grad for name, p in model.named_parameters() if p.requires_grad}}


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_matches_its_twin(backend, generator):
    """Output and every gradient within the contract of the float64 twin, the float32 twin's
    error the yardstick. Timesteps below 16: near t = 1000 the float32 sinusoids (that op's
    contract, test_timestep.py) carry ~1e-4 of rounding that would swamp the rest."""
    config = INTERP_SIZE if backend == "triton" else TINY
    ours = randomize_(DiT(**config, backend=backend), generator).eval()
    same, truth = ReferenceDiT(**config).eval(), ReferenceDiT(**config).double().eval()
    for twin in (same, truth):
        twin.load_state_dict(ours.state_dict())
    x, t, y = random_inputs(ours, 2, generator, max_t=16)
    grad_out = torch.randn(2, ours.out_channels, *x.shape[2:], generator=generator)
    got = outputs_and_grads(ours, x, t, y, grad_out)
    want = outputs_and_grads(same, x, t, y, grad_out)
    exact = outputs_and_grads(truth, x.double(), t, y, grad_out.double())
    assert got.keys() == exact.keys() and len(got) == 2 + len(ours.state_dict()) - 1
    for name, result in got.items():
        assert result.dtype == F32, name
        assert_within_contract("attention", F32, result, want[name], exact[name],
                               kind="forward" if name == "out" else "gradient",
                               what=f"DiT {backend} {name}")


def spy_on_backends(monkeypatch, names):
    """[(op name, its backend argument)] of every call to the named ops, which still run."""
    calls = []

    def spy(name, real):
        def recorded(*args, **kwargs):
            calls.append((name, kwargs["backend"]))
            return real(*args, **kwargs)
        return recorded

    for name in names:
        monkeypatch.setattr(ops, name, spy(name, getattr(ops, name)))
    return calls


def test_backend_reaches_every_op(monkeypatch, generator):
    names = ["timestep_embedding", "layer_norm_modulate", "attention",
             "gated_residual_layer_norm_modulate", "gated_residual"]
    model = DiT(**TINY, backend="triton")
    assert {m.backend for m in (model.t_embedder, *model.blocks, model.final_layer)} == {"triton"}
    model.backend = "reference"
    calls = spy_on_backends(monkeypatch, names)
    model(*random_inputs(model, 2, generator))
    per_block = names[1:]
    assert calls == [(n, "reference") for n in names[:1] + per_block * 2 + names[1:2]]


def test_forward_with_cfg_is_the_releases(generator):
    """Conditional and null halves of one batch: guidance on the first 3 channels of the
    conditional half's input, run at both halves' (t, y); the rest passes through."""
    model = randomize_(DiT(**TINY, backend="reference"), generator).double().eval()
    x, t, y = random_inputs(model, 4, generator)
    x, t, y = x.double(), t[:2].repeat(2), torch.cat([y[:2], torch.full((2,), 10)])
    out = model.forward_with_cfg(x, t, y, 4.0)
    cond, uncond = model(x[:2], t[:2], y[:2]), model(x[:2], t[2:], y[2:])
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    want = torch.cat([torch.cat([guided, cond[:, 3:]], 1), torch.cat([guided, uncond[:, 3:]], 1)])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("layout", ["bare", "ema", "model"])
def test_load_dit_checkpoint_unwraps_training_checkpoints(layout, tmp_path, generator):
    config = {k: v for k, v in TINY.items() if k != "input_size"}  # inferred from pos_embed
    model, other = (randomize_(DiT(**TINY, backend="reference"), generator) for _ in range(2))
    state = model.state_dict()
    saved = {"bare": state, "model": {"model": state},
             "ema": {"model": other.state_dict(), "ema": state, "opt": {"lr": 1e-4},
                     "args": argparse.Namespace(model="DiT-XL/2")}}[layout]
    torch.save(saved, tmp_path / "ckpt.pt")
    loaded = load_dit_checkpoint(tmp_path / "ckpt.pt", DiT, backend="reference", **config)
    assert loaded.grid_size == 4 and not loaded.pos_embed.requires_grad
    assert all(p.requires_grad for n, p in loaded.named_parameters() if n != "pos_embed")
    assert shapes(loaded) == shapes(model)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name
    x, t, y = random_inputs(model, 2, generator)
    torch.testing.assert_close(loaded.eval()(x, t, y), model.eval()(x, t, y), rtol=0, atol=0)


def test_load_dit_checkpoint_rejects_an_unknown_model(tmp_path):
    torch.save({}, tmp_path / "ckpt.pt")
    with pytest.raises(ValueError, match="DiT-XL/2"):
        load_dit_checkpoint(tmp_path / "ckpt.pt", "DiT-M/2", input_size=32)


# --------------------------------------------------------------------------- compile, DDP, DDIM

@pytest.mark.parametrize("backend", BACKENDS)
def test_compiles_fullgraph(backend, generator):
    torch._dynamo.reset()
    config = INTERP_SIZE if backend == "triton" else TINY
    model = randomize_(DiT(**config, backend=backend), generator).eval()
    x, t, y = random_inputs(model, 2, generator)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, t, y), model(x, t, y), rtol=1e-5, atol=1e-5)


def ddp_data(rank=None):
    """Rank's half of a fixed batch of 4 (all of it for rank None)."""
    g = torch.Generator().manual_seed(123)
    x, t, y = torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g), \
        torch.randint(0, 10, (4,), generator=g)
    return (x, t, y) if rank is None else (x[2 * rank:2 * rank + 2], t[2 * rank:2 * rank + 2],
                                           y[2 * rank:2 * rank + 2])


def ddp_train_step(model, rank=None):
    """One SGD step on the mean squared output; no label dropout, so both ranks' halves
    make up the single process's batch."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(*ddp_data(rank)).square().mean().backward()
    optimizer.step()


def make_ddp_model(seed):
    model = DiT(**TINY, class_dropout_prob=0.0).train()
    return randomize_(model, torch.Generator().manual_seed(seed))


def _ddp_worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        model = make_ddp_model(seed=rank)  # DDP starts every rank from rank 0's weights
        ddp_train_step(torch.nn.parallel.DistributedDataParallel(model), rank)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_training_step_keeps_ranks_identical(tmp_path):
    context = mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2,
                       join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2 gloo workers did not finish in 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    start, single = make_ddp_model(seed=0), make_ddp_model(seed=0)
    ddp_train_step(single)
    for name, want in single.state_dict().items():
        assert torch.equal(ranks[0][name], ranks[1][name]), f"{name}: rank 1 != rank 0"
        torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(ranks[0]["blocks.0.attn.qkv.weight"],
                           start.state_dict()["blocks.0.attn.qkv.weight"]), "no step was taken"


def ddim_loop_with_cfg(model, x, labels, scheduler, scale):
    """DiT's sample.py: forward_with_cfg on [x; x] with labels [y; null], keep the epsilon
    of the first half, step."""
    y = torch.cat([labels, torch.full_like(labels, model.num_classes)])
    for t in scheduler.timesteps:
        t_in = torch.full((2 * len(x),), int(t))
        eps = model.forward_with_cfg(torch.cat([x, x]), t_in, y, scale)[:len(x), :x.shape[1]]
        x = scheduler.step(eps, t, x).prev_sample
    return x


def test_ddim_sampler_with_guidance_is_the_releases_loop(generator):
    model = randomize_(DiT(**TINY, backend="reference"), generator).eval()
    x, _, labels = random_inputs(model, 2, generator)
    labels = labels.clamp(max=9)
    sampler = DDIMSampler(model, x.shape, num_steps=3, guidance_scale=4.0, class_labels=labels,
                          guidance_channels=3, backend="reference")
    got = sampler(x, progress=False)
    scheduler = DDIMScheduler(clip_sample=False, backend="reference")
    scheduler.set_timesteps(3)
    torch.testing.assert_close(got, ddim_loop_with_cfg(model, x, labels, scheduler, 4.0),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_cuda_graph_sampling_equals_eager():
    model = randomize_(DiT(**TINY, backend="triton"), torch.Generator().manual_seed(0))
    model = model.cuda().eval()
    x = torch.randn(2, 4, 8, 8, device="cuda")
    kw = dict(num_steps=10, guidance_scale=4.0, class_labels=torch.tensor([1, 3], device="cuda"),
              guidance_channels=3, device="cuda", backend="triton")
    eager = DDIMSampler(model, x.shape, **kw)(x, progress=False)
    sampler = DDIMSampler(model, x.shape, cuda_graph=True, **kw)
    graph = sampler(x, progress=False)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(sampler(x, progress=False), graph), "a replay must repeat itself"
    assert graph.isfinite().all()


# --------------------------------------------------------------------------- validation

@pytest.mark.parametrize("kwargs,name", [
    (dict(input_size=0), "input_size"), (dict(input_size=9), "patch_size"),
    (dict(patch_size=2.0), "patch_size"), (dict(in_channels=True), "in_channels"),
    (dict(hidden_size=26, num_heads=2), "hidden_size"), (dict(depth=0), "depth"),
    (dict(num_classes=0), "num_classes"), (dict(class_dropout_prob=1.5), "class_dropout_prob"),
    (dict(num_heads=5), "num_heads"), (dict(mlp_ratio=0.0), "mlp_ratio"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("cls", [DiT, ReferenceDiT], ids=lambda c: c.__name__)
def test_rejects_bad_arguments(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**{**TINY, **kwargs})


@pytest.mark.parametrize("shape", [(2, 4, 8), (2, 3, 8, 8), (2, 4, 8, 6), (2, 4, 16, 16)])
def test_forward_rejects_bad_latents(shape):
    model, labels = DiT(**TINY, backend="reference"), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"x must be \(B, 4, 8, 8\)"):
        model(torch.zeros(shape), labels, labels)
