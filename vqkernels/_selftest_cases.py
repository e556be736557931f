"""The checks ``vqkernels.selftest`` runs: one per public op, small odd shapes.

Each check runs the op on one backend and returns ``{what: (error, bound)}``
for every output and gradient, judged by ``vqkernels.testing``: the truth is
the reference in float64, the bound a multiple of the same-dtype reference's
error plus a floor (searches: the chosen code's true distance within
``SEARCH_RTOL`` of the minimum). Inputs are drawn on the CPU from the given
generator, so every backend of an op sees the same numbers.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from vqkernels import ops
from vqkernels._dispatch import OpDispatch
from vqkernels.ops import (adaln, ddim, ema, gelu, group_normalization, residual, search,
                           timestep)
from vqkernels.ops.flash_attention import DISPATCH as ATTENTION_DISPATCH
from vqkernels.reference import attention as ref_attention
from vqkernels.reference import ddim as ref_ddim
from vqkernels.reference import ema as ref_ema
from vqkernels.reference import gelu as ref_gelu
from vqkernels.reference import group_norm as ref_group_norm
from vqkernels.reference import search as ref_search
from vqkernels.reference import timestep as ref_timestep
from vqkernels.testing import (ADALN_OPS, SEARCH_RTOL, adaln_magnitudes, attention_magnitudes,
                               code_stats_errors, contract_error, max_abs, nearest_errors)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
Errors = dict[str, tuple[float, float]]
# Odd sizes past one tile of every kernel (64 / 128 rows or codes, 64-wide D chunks);
# D = 72 is also past the CUDA search's auto limit of 64.
N, K, D = 67, 131, 72  # rows, codes, columns of the VQ checks


@dataclass(frozen=True)
class Case:
    """A public op, the dispatch that picks its backend, the dtypes it is checked in, its check."""

    op: str
    dispatch: OpDispatch
    dtypes: tuple[torch.dtype, ...]
    check: Callable[[str, torch.device, torch.dtype, torch.Generator], Errors]
    facts: Callable[[torch.dtype], tuple[torch.dtype, dict]]  # dtype -> what explain() is asked

    def explain(self, device: torch.device, dtype: torch.dtype) -> dict[str, list[str]]:
        dispatch_dtype, shape = self.facts(dtype)
        return self.dispatch.explain(device, dispatch_dtype, **shape)


def _randn(shape, generator, dtype, scale=1.0):
    return (torch.randn(shape, generator=generator, dtype=F64) * scale).to(dtype)


def _with_grads(fn, inputs, upstream):
    """fn(*inputs) as a tuple of outputs, and the gradients of sum <output, upstream> wrt inputs.

    Each upstream gradient is cast to its output's dtype (draw it in the
    lowest dtype compared, so that every run sees the same values).
    """
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [u.to(o.device, o.dtype) for u, o in zip(upstream, outputs)])
    return [o.detach() for o in outputs], [x.grad for x in inputs]


def _expect_dtype(x, dtype, name):
    if x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype}, expected {dtype}")
    return x


def _judge(op, dtype, names, got, same, truth, kind="forward") -> Errors:
    return {name: contract_error(op, dtype, g, s, t, kind=kind)
            for name, g, s, t in zip(names, got, same, truth)}


# --- timestep_embedding: forward and d/dt, in each output dtype -----------------------------

def check_timestep(backend, device, dtype, generator) -> Errors:
    t = torch.rand(67, generator=generator, dtype=F64).mul(1000).float()
    t[-1] = 999.5
    weights = [_randn((67, 301), generator, dtype)]

    def ours(x):
        out = ops.timestep_embedding(x.to(device), 301, dtype=dtype, backend=backend)
        return _expect_dtype(out, dtype, "the embedding")

    got = _with_grads(ours, [t], weights)
    same = _with_grads(lambda x: ref_timestep.timestep_embedding(x, 301, dtype=dtype), [t], weights)
    truth = _with_grads(
        lambda x: ref_timestep.timestep_embedding(x, 301, dtype=F64, math_dtype=F64),
        [_f64(t)], weights)
    errors = _judge("timestep_embedding", dtype, ["forward"], got[0], same[0], truth[0])
    errors.update(_judge("timestep_embedding", dtype, ["grad t"], got[1], same[1], truth[1],
                         kind="gradient"))
    return errors


# --- gelu_tanh: forward and gradient, and the in-place forward --------------------------------

def check_gelu_tanh(backend, device, dtype, generator) -> Errors:
    x = _randn((67, 301), generator, dtype, scale=4.0)
    upstream = [_randn((67, 301), generator, dtype)]

    def ours(v):
        return _expect_dtype(ops.gelu_tanh(v.to(device), backend=backend), dtype, "gelu")

    got = _with_grads(ours, [x], upstream)
    same = _with_grads(ref_gelu.gelu_tanh, [x], upstream)
    truth = _with_grads(ref_gelu.gelu_tanh, [_f64(x)], upstream)
    with torch.no_grad():
        in_place = ops.gelu_tanh(x.to(device), inplace=True, backend=backend)
    errors = _judge("gelu_tanh", dtype, ["forward"], got[0], same[0], truth[0])
    errors.update(_judge("gelu_tanh", dtype, ["in place"], [in_place], same[0], truth[0]))
    errors.update(_judge("gelu_tanh", dtype, ["grad x"], got[1], same[1], truth[1],
                         kind="gradient"))
    return errors


# --- group_norm: GroupNorm + SiLU, NCHW and channels-last, and the gradients ------------------

def check_group_norm(backend, device, dtype, generator) -> Errors:
    x = _randn((3, 64, 9, 7), generator, dtype, scale=2.0)
    params = [_randn((64,), generator, dtype), _randn((64,), generator, dtype)]
    upstream = [_randn((3, 64, 9, 7), generator, dtype)]
    errors = {}
    for layout, memory_format in (("nchw", torch.contiguous_format),
                                  ("nhwc", torch.channels_last)):
        def ours(v, w, b):
            v = v.to(device).contiguous(memory_format=memory_format)
            out = ops.group_norm(v, 32, w.to(device), b.to(device), silu=True, backend=backend)
            return _expect_dtype(out, dtype, "y")

        def spec(v, w, b):
            return ref_group_norm.group_norm(v, 32, w, b, 1e-5, silu=True)

        got = _with_grads(ours, [x, *params], upstream)
        same = _with_grads(spec, [x, *params], upstream)
        truth = _with_grads(spec, [_f64(x), *map(_f64, params)], upstream)
        errors.update(_judge("group_norm", dtype, [f"{layout} y"], got[0], same[0], truth[0]))
        errors.update(_judge("group_norm", dtype, [f"{layout} grad {n}" for n in "xwb"], got[1],
                             same[1], truth[1], kind="gradient"))
    return errors


# --- search: nearest_code, nearest_code_with_stats, vector_quantize -------------------------

def check_nearest_code(backend, device, dtype, generator) -> Errors:
    z, codebook = _randn((N, D), generator, dtype), _randn((K, D), generator, dtype)
    indices, distances = ops.nearest_code(z.to(device), codebook.to(device), backend=backend)
    _expect_indices(indices, N)
    return nearest_errors(z, codebook, indices, distances, search.default_precision(dtype))


def check_nearest_code_with_stats(backend, device, dtype, generator) -> Errors:
    z, codebook = _randn((N, D), generator, dtype), _randn((K, D), generator, dtype)
    indices, distances, counts, sums = ops.nearest_code_with_stats(
        z.to(device), codebook.to(device), backend=backend)
    _expect_indices(indices, N)
    errors = nearest_errors(z, codebook, indices, distances, search.default_precision(dtype))
    return {**errors, **code_stats_errors(z, indices, K, counts, sums)}


def check_vector_quantize(backend, device, dtype, generator) -> Errors:
    """On well separated codes (one right answer per row), so that every backend picks it.

    The loss's upstream gradient is N * D, which makes the gradients O(1):
    the contract's floor is relative to max(1, |truth|).
    """
    codebook = _randn((K, D), generator, F64, scale=10.0)
    z = codebook[torch.randint(0, K, (N,), generator=generator)] + _randn((N, D), generator, F64)
    z, codebook = z.to(dtype), codebook.to(dtype)
    upstream = [_randn((N, D), generator, dtype), torch.tensor(float(N * D))]

    def ours(a, b):
        z_q, loss, _ = ops.vector_quantize(a.to(device), b.to(device), backend=backend)
        return _expect_dtype(z_q, dtype, "z_q"), loss

    def run(fn, cast):
        return _with_grads(lambda a, b: fn(a, b)[:2], [cast(z), cast(codebook)], upstream)

    got, same = run(ours, lambda x: x), run(ref_search.vector_quantize, lambda x: x)
    truth = run(ref_search.vector_quantize, _f64)
    errors = _judge("vector_quantize", dtype, ["z_q", "loss"], got[0], same[0], truth[0])
    errors.update(_judge("vector_quantize", dtype, ["grad z", "grad codebook"], got[1], same[1],
                         truth[1], kind="gradient"))
    return errors


def check_residual_nearest_code(backend, device, dtype, generator) -> Errors:
    """Three stages, each finer: stage q's code is judged against the exact (fp64) residual the
    chosen codes before it leave; the stages search a float32 residual (float64 for float64),
    at bf16 products for 16-bit input, so their bound is the float32 search's. The training
    step's variant must choose the same codes, and count and sum each stage's residual."""
    books = [_randn((K - 40 * q, D), generator, dtype, scale=0.5 ** q) for q in range(3)]
    z = _randn((N, D), generator, dtype)
    on_device = (z.to(device), [b.to(device) for b in books])
    indices, quantized = ops.residual_nearest_code(*on_device, backend=backend)
    *same, counts, sums = ops.residual_nearest_code_with_stats(*on_device, backend=backend)
    if not (torch.equal(same[0], indices) and torch.equal(same[1], quantized)):
        raise ValueError("residual_nearest_code_with_stats chose other codes than "
                         "residual_nearest_code")
    if indices.dtype != torch.int64 or tuple(indices.shape) != (N, len(books)):
        raise ValueError(f"indices must be int64 ({N}, {len(books)}), got {indices.dtype} "
                         f"{tuple(indices.shape)}")
    _expect_dtype(quantized, dtype, "quantized")
    search_dtype = dtype if dtype in (F32, F64) else F32
    rtol = SEARCH_RTOL[(search_dtype, search.default_precision(dtype))]
    residual, total, errors = z.double(), torch.zeros(N, D, dtype=F64), {}
    for q, (book, chosen) in enumerate(zip(books, indices.cpu().unbind(1))):
        codes = book.double()
        true = ((residual[:, None, :] - codes[None]) ** 2).sum(-1)
        gap = true.gather(1, chosen[:, None])[:, 0] - true.min(1).values
        scale = residual.square().sum(1) + codes.square().sum(1).max()
        errors[f"stage {q} indices"] = ((gap / scale).max().item(), rtol)
        expected_counts = torch.bincount(chosen, minlength=codes.shape[0]).double()
        errors[f"stage {q} counts"] = ((counts[q].cpu().double() - expected_counts).abs().max()
                                       .item(), 0.0)
        expected_sums = torch.zeros_like(codes).index_add_(0, chosen, residual)
        sum_error = (sums[q].cpu().double() - expected_sums).abs() / (
            torch.zeros_like(codes).index_add_(0, chosen, residual.abs()) + 1)
        errors[f"stage {q} sums"] = (sum_error.max().item(), 64 * torch.finfo(F32).eps)
        residual, total = residual - codes[chosen], total + codes[chosen]
    error = ((quantized.cpu().double() - total).abs() / total.abs().clamp(min=1)).max().item()
    errors["quantized"] = (error, 4 * torch.finfo(dtype).eps)  # fp32 sums, one rounding to dtype
    return errors


def _f64(x):
    return x.to(F64)


def _expect_indices(indices, n):
    if indices.dtype != torch.int64 or tuple(indices.shape) != (n,):
        raise ValueError(f"indices must be int64 ({n},), got {indices.dtype} "
                         f"{tuple(indices.shape)}")


# --- EMA: code_counts_and_sums, ema_update_ -------------------------------------------------

def check_code_counts_and_sums(backend, device, dtype, generator) -> Errors:
    z, indices = _randn((N, D), generator, dtype), torch.randint(0, K, (N,), generator=generator)
    counts, sums = ops.code_counts_and_sums(z.to(device), indices.to(device), K, backend=backend)
    return code_stats_errors(z, indices, K, counts, sums)


def ema_codebook_dtype(dtype):
    """The codebook in z's dtype where the GPU kernels take it, else the float32 state's."""
    return dtype if dtype in ema.GPU_DTYPES else F32


def _ema_state(k, generator, dtype) -> list[torch.Tensor]:
    """A random EMA state of k codes: cluster_size, embed_sum (float32) and the codebook."""
    cluster_size = torch.rand(k, generator=generator) + 0.5
    return [cluster_size, _randn((k, D), generator, F32) * cluster_size[:, None],
            _randn((k, D), generator, ema_codebook_dtype(dtype))]


def check_ema_update(backend, device, dtype, generator) -> Errors:
    z, indices = _randn((N, D), generator, dtype), torch.randint(0, K, (N,), generator=generator)
    state = _ema_state(K, generator, dtype)
    options = dict(decay=0.9, eps=1e-5, bias_correction=True, step=3)
    ours = [x.clone().to(device) for x in state]
    ops.ema_update_(*ours, z.to(device), indices.to(device), backend=backend, **options)
    same, truth = [x.clone() for x in state], [x.to(F64) for x in state]
    ref_ema.ema_update_(*same, z, indices, **options)
    ref_ema.ema_update_(*truth, z.to(F64), indices, **options)
    return {name: contract_error("ema_update", s.dtype, o, s, t)
            for name, o, s, t in zip(("cluster_size", "embed_sum", "codebook"), ours, same, truth)}


def check_ema_update_stages(backend, device, dtype, generator) -> Errors:
    """Two stages (K and K - 40 codes) from their batches' statistics: each as the
    reference updates it alone, within the EMA contract."""
    states, stats = [], []
    for k in (K, K - 40):
        z = _randn((N, D), generator, dtype)
        indices = torch.randint(0, k, (N,), generator=generator)
        states.append(_ema_state(k, generator, dtype))
        stats.append([x.float() for x in ref_ema.code_counts_and_sums(z.to(F64), indices, k)])
    options = dict(decay=0.9, eps=1e-5, bias_correction=True, step=3)
    ours = [[x.clone().to(device) for x in state] for state in states]
    ops.ema_update_stages_(*(list(column) for column in zip(*ours)),
                           [tuple(x.to(device) for x in pair) for pair in stats], backend=backend,
                           **options)
    errors, scalars = {}, tuple(options.values())
    for q, (state, pair, got) in enumerate(zip(states, stats, ours)):
        same, truth = [x.clone() for x in state], [x.to(F64) for x in state]
        ref_ema.ema_update_from_stats_(*same, *pair, *scalars)
        ref_ema.ema_update_from_stats_(*truth, *(x.to(F64) for x in pair), *scalars)
        for name, o, s, t in zip(("cluster_size", "embed_sum", "codebook"), got, same, truth):
            errors[f"stage {q} {name}"] = contract_error("ema_update", s.dtype, o, s, t)
    return errors


# --- attention: forward and d/dq, d/dk, d/dv at DiT's head dim -------------------------------

def check_attention(backend, device, dtype, generator) -> Errors:
    q, k, v = (_randn((1, 2, s, 72), generator, dtype) for s in (67, 131, 131))
    grad_out = _randn((1, 2, 67, 72), generator, dtype)

    def ours(*x):
        out = ops.attention(*(t.to(device) for t in x), backend=backend)
        return _expect_dtype(out, dtype, "the output")

    def run(fn, cast):
        return _with_grads(fn, [cast(x) for x in (q, k, v)], [grad_out])

    got, same = run(ours, lambda x: x), run(ref_attention.attention, lambda x: x)
    truth = run(ref_attention.attention, _f64)
    sizes = attention_magnitudes(q, k, v, grad_out)
    return {name: contract_error("attention", dtype, g, s, t, magnitude=sizes[key],
                                 kind="forward" if key == "out" else "gradient")
            for name, key, g, s, t in zip(("out", "grad q", "grad k", "grad v"),
                                          ("out", "dq", "dk", "dv"),
                                          got[0] + got[1], same[0] + same[1], truth[0] + truth[1])}


# --- adaLN: outputs and every input's gradient, odd D past one 1024-column tile --------------

def _adaln_check(op):
    inputs, outputs = ADALN_OPS[op]

    def check(backend, device, dtype, generator) -> Errors:
        b, t, d = 2, 37, 1153
        drawn = {"x": _randn((b, t, d), generator, dtype, 2.0),
                 "y": _randn((b, t, d), generator, dtype)}
        drawn.update({name: _randn((b, d), generator, dtype, 0.5)
                      for name in ("gate", "shift", "scale")})
        args = [drawn[name] for name in inputs]
        upstream = [_randn((b, t, d), generator, dtype) for _ in outputs]
        fn = getattr(ops, op)

        def ours(*x):
            out = fn(*(v.to(device) for v in x), backend=backend)
            out = out if isinstance(out, tuple) else (out,)
            return tuple(_expect_dtype(o, dtype, name) for o, name in zip(out, outputs))

        def reference(*x):
            return fn(*x, backend="reference")

        got, same = _with_grads(ours, args, upstream), _with_grads(reference, args, upstream)
        truth = _with_grads(reference, [_f64(a) for a in args], upstream)
        sizes = adaln_magnitudes(**dict(zip(inputs, args)),
                                 **{"grad_" + name: u for name, u in zip(outputs, upstream)})
        names = list(outputs) + [f"grad {name}" for name in inputs]
        keys = list(outputs) + list(inputs)
        return {name: contract_error("adaln", dtype, g, s, t, magnitude=sizes[key],
                                     kind="forward" if key in outputs else "gradient")
                for name, key, g, s, t in zip(names, keys, got[0] + got[1], same[0] + same[1],
                                              truth[0] + truth[1])}

    return check


# --- ddim_step: guidance on a [cond; uncond] batch, per-sample timesteps, given noise ----------

DDIM_OPTIONS = dict(num_inference_steps=20, eta=0.5)


def _ddim_reference(model_output, timesteps, sample, table, noise):
    cond, uncond = model_output.chunk(2)
    guided = ref_ddim.cfg_combine(uncond, cond, 4.0)[:, :sample.shape[1]]
    return ref_ddim.ddim_step(guided, timesteps, sample, table, 1.0, variance_noise=noise,
                              **DDIM_OPTIONS)


def check_ddim_step(backend, device, dtype, generator) -> Errors:
    sample, noise = (_randn((3, 4, 17, 19), generator, dtype) for _ in range(2))
    model_output = _randn((6, 8, 17, 19), generator, dtype)  # [cond; uncond], learned sigma
    timesteps = torch.tensor([980, 500, 0])  # 0 steps past the start: final_alpha_cumprod
    table = ref_ddim.alphas_cumprod(ref_ddim.betas_for_schedule())  # float64, T = 1000
    ours = ops.ddim_step(model_output.to(device), timesteps.to(device), sample.to(device),
                         table.to(device), guidance_scale=4.0, variance_noise=noise.to(device),
                         backend=backend, **DDIM_OPTIONS)
    same = _ddim_reference(model_output, timesteps, sample, table, noise)
    truth = _ddim_reference(_f64(model_output), timesteps, _f64(sample), table, _f64(noise))
    for name, o in zip(("prev_sample", "pred_original_sample"), ours):
        _expect_dtype(o, dtype, name)
    return {name: contract_error("ddim_step", dtype, o, s, t, magnitude=max_abs(*truth))
            for name, o, s, t in zip(("prev_sample", "pred_original_sample"), ours, same, truth)}


# --- the cases --------------------------------------------------------------------------------

def _plain(dtype):
    return dtype, {}


def _search_facts(dtype):
    return dtype, {"dim": D}


CASES = (
    Case("timestep_embedding", timestep.DISPATCH, (F32, F64, F16, BF16), check_timestep,
         lambda dtype: (F32, {})),  # dtype is the output's; t is float32
    Case("nearest_code", search.DISPATCH, (F32, F64, F16, BF16), check_nearest_code,
         _search_facts),
    Case("vector_quantize", search.DISPATCH, (F32, F64, F16, BF16), check_vector_quantize,
         _search_facts),
    Case("nearest_code_with_stats", search.DISPATCH, (F32, F64, F16, BF16),
         check_nearest_code_with_stats, _search_facts),
    Case("residual_nearest_code", residual.DISPATCH, (F32, F64, F16, BF16),
         check_residual_nearest_code, _search_facts),
    Case("code_counts_and_sums", ema.STATS_DISPATCH, (F32, F64, F16, BF16),
         check_code_counts_and_sums, _plain),
    Case("ema_update_", ema.DISPATCH, (F32, F64, F16, BF16), check_ema_update,
         lambda dtype: (dtype, {"codebook_dtype": ema_codebook_dtype(dtype)})),
    Case("ema_update_stages_", ema.STAGES_DISPATCH, (F32, F64, F16, BF16),
         check_ema_update_stages,
         lambda dtype: (ema.STATE_DTYPE, {"codebook_dtype": ema_codebook_dtype(dtype)})),
    Case("attention", ATTENTION_DISPATCH, (F32, F64, F16, BF16), check_attention,
         lambda dtype: (dtype, {"head_dim": 72})),
    Case("ddim_step", ddim.DISPATCH, (F32, F16, BF16), check_ddim_step, _plain),
    Case("gelu_tanh", gelu.DISPATCH, (F32, F64, F16, BF16), check_gelu_tanh, _plain),
    Case("group_norm", group_normalization.DISPATCH, (F32, F64, F16, BF16), check_group_norm,
         _plain),
    *(Case(op, dispatch, (F32, F64, F16, BF16), _adaln_check(op), _plain)
      for op, dispatch in (("layer_norm_modulate", adaln.NORM_DISPATCH),
                           ("gated_residual", adaln.RESIDUAL_DISPATCH),
                           ("gated_residual_layer_norm_modulate", adaln.FUSED_DISPATCH))),
)
