"""Property tests: every op takes inputs in any memory layout.

Each input gets a drawn layout: any dimension order (permuted, channels_last),
a step along any dimension, a storage offset, stride-0 (expanded) dimensions,
and zero-size dimensions; the storage around its elements holds NaN (-1 for
integers), so a misread element shows. The backend and dtype are part of each
example. An op must give what the reference gives on ``.contiguous()`` copies
(within vqkernels.testing's contract), or raise a ValueError naming the
argument; its kernel must receive inputs it reads in place, copied at most
once (``watched``). ``VQKERNELS_LAYOUT_EXAMPLES`` sets the examples per op.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layout_tools import draw_tensor, sizes, unit_inner_stride, watched
from vqkernels import _ext, ops
from vqkernels.ops._layout import has_overlap
from vqkernels.reference import attention as ref_attention
from vqkernels.reference import ddim as ref_ddim
from vqkernels.reference import ema as ref_ema
from vqkernels.reference import timestep as ref_timestep
from vqkernels.testing import (ADALN_OPS, adaln_magnitudes, assert_code_stats, assert_nearest,
                               assert_within_contract, attention_magnitudes, max_abs)

EXAMPLES = int(os.environ.get("VQKERNELS_LAYOUT_EXAMPLES", "200"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
HALF = (torch.float16, torch.bfloat16)
GPU_DTYPES = (torch.float32,) + HALF
ALL_DTYPES = (torch.float32, torch.float64) + HALF
BACKENDS = ("reference",) + (("cpu",) if _ext._C is not None else ()) + (
    ("triton",) if os.environ.get("TRITON_INTERPRET") == "1" else ())
TABLE = ref_ddim.alphas_cumprod(ref_ddim.betas_for_schedule())  # float64, T = 1000


def cases(**dtypes_by_backend):
    """(backend, dtype) pairs of the backends that run here."""
    return [(b, d) for b in BACKENDS for d in dtypes_by_backend[b]]


# --- ops -----------------------------------------------------------------------------------

@SETTINGS
@given(data=st.data())
def test_timestep_embedding(data):
    backend, dtype = data.draw(st.sampled_from(cases(reference=ALL_DTYPES, cpu=ALL_DTYPES,
                                                     triton=ALL_DTYPES)), label="backend, dtype")
    t_dtype = data.draw(st.sampled_from((torch.int64, torch.int32) + ALL_DTYPES), label="t dtype")
    s = sizes(data, n=(0, 6), dim=(1, 9))
    values = torch.randint(0, 1000, (s["n"],), generator=torch.Generator().manual_seed(
        data.draw(st.integers(0, 2 ** 31), label="t seed"))).to(t_dtype)
    t = draw_tensor(data, "t", (s["n"],), t_dtype, values=values)
    out = watched(backend, lambda: ops.timestep_embedding(t, s["dim"], dtype=dtype,
                                                          backend=backend), {"t": t})
    ref = ref_timestep.timestep_embedding(t.contiguous(), s["dim"], dtype=dtype)
    truth = ref_timestep.timestep_embedding(t.contiguous(), s["dim"], dtype=torch.float64,
                                            math_dtype=torch.float64)
    assert_within_contract("timestep_embedding", dtype, out, ref, truth, what=backend)


SEARCH_CASES = cases(reference=ALL_DTYPES, cpu=ALL_DTYPES, triton=GPU_DTYPES)


def search_inputs(data):
    backend, dtype = data.draw(st.sampled_from(SEARCH_CASES), label="backend, dtype")
    s = sizes(data, n=(0, 7), k=(1, 6), d=(1, 6))
    z = draw_tensor(data, "z", (s["n"], s["d"]), dtype)
    codebook = draw_tensor(data, "codebook", (s["k"], s["d"]), dtype)
    return backend, z, codebook


def check_nearest(z, codebook, indices, distances, metric, what):
    precision = ops.search.default_precision(z.dtype)
    if metric == "cosine":  # on unit vectors the l2 distance is 2 (1 - cos)
        work = torch.float64 if z.dtype == torch.float64 else torch.float32
        z, codebook = (F.normalize(x.to(work), dim=1) for x in (z, codebook))
        distances = 2 * distances
    assert_nearest(z.contiguous(), codebook.contiguous(), indices, distances, precision, what)


@SETTINGS
@given(data=st.data())
def test_nearest_code(data):
    backend, z, codebook = search_inputs(data)
    metric = data.draw(st.sampled_from(("l2", "cosine")), label="metric")
    indices, distances = watched(backend, lambda: ops.nearest_code(
        z, codebook, metric=metric, backend=backend), {"z": z, "codebook": codebook})
    check_nearest(z, codebook, indices, distances, metric, f"{backend} {metric}")


@SETTINGS
@given(data=st.data())
def test_nearest_code_with_stats(data):
    backend, z, codebook = search_inputs(data)
    deterministic = data.draw(st.booleans(), label="deterministic")
    indices, distances, counts, sums = watched(backend, lambda: ops.nearest_code_with_stats(
        z, codebook, deterministic=deterministic, backend=backend), {"z": z, "codebook": codebook})
    check_nearest(z, codebook, indices, distances, "l2", backend)
    assert_code_stats(z.contiguous(), indices, codebook.shape[0], counts, sums, what=backend)


@SETTINGS
@given(data=st.data())
def test_vector_quantize(data):
    backend, z, codebook = search_inputs(data)
    beta = data.draw(st.sampled_from((0.25, 1.0)), label="beta")
    z, codebook = z.detach().requires_grad_(), codebook.detach().requires_grad_()
    z_q, loss, indices = watched(backend, lambda: ops.vector_quantize(
        z, codebook, beta=beta, backend=backend), {"z": z, "codebook": codebook})
    zd, cd = z.detach().double(), codebook.detach().double()
    zq = cd[indices]
    check_nearest(z.detach(), codebook.detach(), indices, (zd - zq).square().sum(1), "l2",
                  backend)
    (z_q.double().sum() + loss.double()).backward()
    scale = 2 / max(z.numel(), 1)
    want_grad_z = 1 + scale * (zd - zq)
    want_grad_cb = torch.zeros_like(cd).index_add_(0, indices, beta * scale * (zq - zd))
    rtol = 1e-2 if z.dtype in HALF else 1e-5
    for name, got, want in (("z_q", z_q, zq), ("loss", loss, (1 + beta) * (zq - zd).square()
                                                        .sum() / max(z.numel(), 1)),
                            ("z.grad", z.grad, want_grad_z), ("codebook.grad", codebook.grad,
                                                              want_grad_cb)):
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol, msg=name)


@SETTINGS
@given(data=st.data())
def test_code_counts_and_sums(data):
    backend, dtype = data.draw(st.sampled_from(SEARCH_CASES), label="backend, dtype")
    s = sizes(data, n=(0, 7), k=(1, 5), d=(1, 5))
    z = draw_tensor(data, "z", (s["n"], s["d"]), dtype)
    index_dtype = data.draw(st.sampled_from((torch.int64, torch.int32)), label="index dtype")
    values = torch.randint(0, s["k"], (s["n"],), generator=torch.Generator().manual_seed(
        data.draw(st.integers(0, 2 ** 31), label="indices seed")), dtype=index_dtype)
    indices = draw_tensor(data, "indices", (s["n"],), index_dtype, values=values)
    counts, sums = watched(backend, lambda: ops.code_counts_and_sums(
        z, indices, s["k"], backend=backend), {"z": z, "indices": indices})
    assert_code_stats(z.contiguous(), indices.long(), s["k"], counts, sums, what=backend)


def draw_state(data, k, d, codebook_dtype):
    """cluster_size, embed_sum, codebook in drawn layouts (stride 0 in one of four examples)."""
    expand = data.draw(st.sampled_from((False, False, False, True)), label="expanded state")
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31), label="state seed"))
    values = (torch.rand(k, generator=gen) + 0.5, torch.randn(k, d, generator=gen),
              torch.randn(k, d, generator=gen).to(codebook_dtype))
    return tuple(draw_tensor(data, name, x.shape, x.dtype, values=x, expand=expand)
                 for name, x in zip(("cluster_size", "embed_sum", "codebook"), values))


def expect_overlap_error(fn, state, names=("cluster_size", "embed_sum", "codebook")):
    """True (after checking the error) when a state buffer shares memory between elements."""
    overlapping = [name for name, x in zip(names, state) if has_overlap(x)]
    if overlapping:
        with pytest.raises(ValueError, match=f"{overlapping[0]} must not have elements sharing"):
            fn()
    return bool(overlapping)


@SETTINGS
@given(data=st.data())
def test_ema_update(data):
    backend, dtype = data.draw(st.sampled_from(SEARCH_CASES), label="backend, z dtype")
    s = sizes(data, n=(0, 7), k=(1, 5), d=(1, 4))
    codebook_dtype = data.draw(st.sampled_from((torch.float32, dtype)), label="codebook dtype")
    state = draw_state(data, s["k"], s["d"], codebook_dtype)
    before = [x.clone() for x in state]
    z = draw_tensor(data, "z", (s["n"], s["d"]), dtype)
    indices = torch.randint(0, s["k"], (s["n"],))
    counts, sums = (x.float() for x in ref_ema.code_counts_and_sums(z.contiguous(), indices,
                                                                    s["k"]))
    batch = {"z": z, "indices": indices}
    if data.draw(st.booleans(), label="from stats"):
        batch = {"stats": (draw_tensor(data, "counts", counts.shape, torch.float32, values=counts),
                           draw_tensor(data, "sums", sums.shape, torch.float32, values=sums))}
        counts, sums = (x.contiguous() for x in batch["stats"])

    def run():
        ops.ema_update_(*state, **batch, decay=0.9, backend=backend)

    if expect_overlap_error(run, state):
        return
    watched(backend, run, dict(zip(("cluster_size", "embed_sum", "codebook"), state), z=z))
    same, truth = [x.clone() for x in before], [x.double() for x in before]
    ref_ema.ema_update_from_stats_(*same, counts, sums, 0.9, 1e-5, False, None)
    ref_ema.ema_update_from_stats_(*truth, counts.double(), sums.double(), 0.9, 1e-5, False, None)
    for name, *outs in zip(("cluster_size", "embed_sum", "codebook"), state, same, truth):
        key = torch.float32 if outs[0].dtype == torch.float64 else outs[0].dtype  # fp32 math
        assert_within_contract("ema_update", key, *outs, what=f"{backend} {name}")


@SETTINGS
@given(data=st.data())
def test_kmeans(data):
    backend, dtype = data.draw(st.sampled_from(SEARCH_CASES), label="backend, dtype")
    s = sizes(data, n=(1, 7), k=(1, 4), d=(1, 4), iters=(0, 2))
    metric = data.draw(st.sampled_from(("l2", "cosine")), label="metric")
    z = draw_tensor(data, "z", (s["n"], s["d"]), dtype)

    def run(x):
        gen = torch.Generator().manual_seed(0)
        return ops.kmeans(x, s["k"], s["iters"], metric=metric, generator=gen, backend=backend)

    got = watched(backend, lambda: run(z), {"z": z})
    for name, g, w in zip(("centers", "cluster_size"), got, run(z.contiguous())):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=f"{backend} {name}")


@SETTINGS
@given(data=st.data())
def test_replace_dead_codes(data):
    dtype = data.draw(st.sampled_from(ALL_DTYPES), label="dtype")
    s = sizes(data, n=(0, 6), k=(1, 5), d=(1, 4))
    cluster_size, embed_sum, codebook = draw_state(data, s["k"], s["d"], dtype)
    z = draw_tensor(data, "z", (s["n"], s["d"]), dtype)
    state = (codebook, cluster_size, embed_sum)
    names = ("codebook", "cluster_size", "embed_sum")

    def run(buffers, rows):
        return ops.replace_dead_codes_(*buffers, rows, 1.0,  # about half the codes are dead
                                       generator=torch.Generator().manual_seed(0))

    if expect_overlap_error(lambda: run(state, z), state, names):
        return
    dense = tuple(x.clone(memory_format=torch.contiguous_format) for x in state)
    want = run(dense, z.contiguous())
    assert torch.equal(run(state, z), want)
    for name, got, expected in zip(names, state, dense):
        assert torch.equal(got, expected), name


ATTENTION_CASES = cases(reference=ALL_DTYPES, cpu=(torch.float32, torch.float64),
                        triton=GPU_DTYPES)


@SETTINGS
@given(data=st.data())
def test_attention(data):
    backend, dtype = data.draw(st.sampled_from(ATTENTION_CASES), label="backend, dtype")
    s = sizes(data, b=(0, 2), h=(0, 2), sq=(0, 5), sk=(1, 5), d=(1, 9))
    q = draw_tensor(data, "q", (s["b"], s["h"], s["sq"], s["d"]), dtype)
    k, v = (draw_tensor(data, name, (s["b"], s["h"], s["sk"], s["d"]), dtype) for name in "kv")
    grads = data.draw(st.booleans(), label="gradients")
    leaves = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    out = watched(backend, lambda: ops.attention(*leaves, backend=backend),
                  dict(zip("qkv", leaves)), unit_inner_stride)
    dense = [x.detach().contiguous().requires_grad_(grads) for x in (q, k, v)]
    truth_in = [x.detach().double().requires_grad_(grads) for x in dense]
    same, truth = ref_attention.attention(*dense), ref_attention.attention(*truth_in)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    terms = attention_magnitudes(*dense, grad_out)
    assert_within_contract("attention", dtype, out, same, truth, magnitude=terms["out"],
                           what=f"{backend} out")
    if grads:
        for o, inputs in ((out, leaves), (same, dense), (truth, truth_in)):
            o.backward(grad_out.to(o.dtype))
        for name, *g in zip("qkv", leaves, dense, truth_in):
            assert_within_contract("attention", dtype, *(x.grad for x in g), kind="gradient",
                                   magnitude=terms[f"d{name}"], what=f"{backend} d{name}")


@SETTINGS
@given(data=st.data())
def test_adaln(data):
    backend, dtype = data.draw(st.sampled_from(cases(reference=ALL_DTYPES, cpu=ALL_DTYPES,
                                                     triton=GPU_DTYPES)), label="backend, dtype")
    op = data.draw(st.sampled_from(sorted(ADALN_OPS)), label="op")
    s = sizes(data, b=(0, 2), t=(0, 4), d=(1, 9))
    param_shape = ((s["b"], s["t"], s["d"]) if data.draw(st.booleans(), label="per token")
                   else (s["b"], s["d"]))
    names, out_names = ADALN_OPS[op]
    inputs = {name: draw_tensor(data, name, (s["b"], s["t"], s["d"]) if name in "xy"
                                else param_shape, dtype) for name in names}
    leaves = {name: v.detach().requires_grad_() for name, v in inputs.items()}
    fn = getattr(ops, op)
    out = watched(backend, lambda: fn(*leaves.values(), backend=backend), leaves,
                  unit_inner_stride)
    dense = {name: v.detach().contiguous().requires_grad_() for name, v in inputs.items()}
    truth_in = {name: v.detach().double().requires_grad_() for name, v in dense.items()}
    results = [o if isinstance(o, tuple) else (o,)
               for o in (out, fn(*dense.values(), backend="reference"),
                         fn(*truth_in.values(), backend="reference"))]
    upstream = [torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
                for o in results[0]]
    terms = adaln_magnitudes(**dense, **{"grad_" + n: u for n, u in zip(out_names, upstream)})
    for name, got, same, truth in zip(out_names, *results):
        assert_within_contract("adaln", dtype, got, same, truth, magnitude=terms[name],
                               what=f"{op} {backend} {name}")
    for outputs in results:
        torch.autograd.backward(outputs, [u.to(o.dtype) for u, o in zip(upstream, outputs)])
    for name in names:
        assert_within_contract("adaln", dtype, leaves[name].grad, dense[name].grad,
                               truth_in[name].grad, kind="gradient", magnitude=terms[name],
                               what=f"{op} {backend} d{name}")


DDIM_CASES = cases(reference=ALL_DTYPES, cpu=GPU_DTYPES, triton=GPU_DTYPES)


def draw_ddim_call(data, dtype):
    """(kwargs of ops.ddim_step for the drawn layouts, the same on contiguous copies)."""
    s = sizes(data, b=(0, 3), c=(1, 3), h=(0, 3), w=(1, 3), extra=(0, 2))
    ndim = data.draw(st.sampled_from((1, 2, 4)), label="sample ndim")
    shape = ((s["b"],), (s["b"], s["c"]), (s["b"], s["c"], s["h"], s["w"]))[(1, 2, 4).index(ndim)]
    out_shape = shape if ndim == 1 else (shape[0], shape[1] + s["extra"], *shape[2:])
    mode = data.draw(st.sampled_from(("none", "batched", "separate")), label="guidance")
    if mode == "batched":
        out_shape = (2 * shape[0], *out_shape[1:])
    kw = dict(sample=draw_tensor(data, "sample", shape, dtype),
              model_output=draw_tensor(data, "model_output", out_shape, dtype))
    if mode != "none":
        kw["guidance_scale"] = 3.0
    if mode == "separate":
        kw["uncond_output"] = draw_tensor(data, "uncond_output", out_shape, dtype)
    if data.draw(st.booleans(), label="eta > 0"):
        kw.update(eta=0.7, variance_noise=draw_tensor(data, "variance_noise", shape, dtype))
    picks = data.draw(st.lists(st.integers(0, 19), min_size=shape[0], max_size=shape[0]),
                      label="timestep picks")
    steps = torch.arange(999, 0, -50)[torch.tensor(picks, dtype=torch.int64)]
    kw["timestep"] = data.draw(st.sampled_from(
        (901, draw_tensor(data, "timestep", steps.shape, torch.int64, values=steps))),
        label="timestep")
    kw.update(prediction_type=data.draw(st.sampled_from(ref_ddim.PREDICTION_TYPES),
                                        label="prediction"),
              clip_sample=data.draw(st.booleans(), label="clip"))
    dense = {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    return kw, dense


def ddim(backend, **kw):
    return ops.ddim_step(kw.pop("model_output"), kw.pop("timestep"), kw.pop("sample"), TABLE,
                         num_inference_steps=20, backend=backend, **kw)


@SETTINGS
@given(data=st.data())
def test_ddim_step(data):
    backend, dtype = data.draw(st.sampled_from(DDIM_CASES), label="backend, dtype")
    kw, dense = draw_ddim_call(data, dtype)
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor)}
    got = watched(backend, lambda: ddim(backend, **kw), tensors, unit_inner_stride)
    same = ddim("reference", **{k: v.to(dtype) if isinstance(v, torch.Tensor) and
                                v.is_floating_point() else v for k, v in dense.items()})
    f64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in dense.items()}
    truth, unclipped = ddim("reference", **f64), ddim("reference", **{**f64, "clip_sample": False})
    for name, out, ref, true in zip(("prev_sample", "pred_original_sample"), got, same, truth):
        assert out.shape == true.shape and out.dtype == dtype, name
        key = torch.float32 if dtype == torch.float64 else dtype  # the reference is the truth
        assert_within_contract("ddim_step", key, out, ref, true, what=f"{backend} {name}",
                               magnitude=max_abs(*truth, *unclipped))  # x0 before clipping


def _module_case(kind, backend):
    """(module factory, input shape) of each module, with ``backend``."""
    from vqkernels import nn as vqnn
    from vqkernels.sampling import DDIMSampler

    torch.manual_seed(0)
    return {
        "TimestepEmbedder": (lambda: vqnn.TimestepEmbedder(8, 6, backend=backend), (3,)),
        "Attention": (lambda: vqnn.Attention(8, 2, backend=backend), (2, 3, 8)),
        "VectorQuantizer": (lambda: vqnn.VectorQuantizer(5, 3, backend=backend), (2, 3, 2, 2)),
        "VectorQuantize": (lambda: vqnn.VectorQuantize(3, 5, accept_image_fmap=True,
                                                       backend=backend), (2, 3, 2, 2)),
        "DDIMSampler": (lambda: (lambda x: DDIMSampler(
            lambda x, t: torch.tanh(x), (2, 3, 2, 2), num_steps=3, backend=backend)(
                x, progress=False)), (2, 3, 2, 2)),
    }[kind]


@settings(SETTINGS, max_examples=max(EXAMPLES // 4, 10))
@given(data=st.data())
def test_modules(data):
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    kind = data.draw(st.sampled_from(("TimestepEmbedder", "Attention", "VectorQuantizer",
                                      "VectorQuantize", "DDIMSampler")), label="module")
    make, shape = _module_case(kind, backend)
    x = draw_tensor(data, "x", shape, torch.float32, scale=100.0 if len(shape) == 1 else 1.0)
    outputs = []
    for inputs in (x, x.contiguous()):
        torch.manual_seed(0)
        module = make()
        with torch.no_grad():
            outputs.append(module(inputs))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5, msg=kind)
