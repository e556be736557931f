"""Benchmark cases of the DDIM step (``vqkernels.ops.ddim_step``) and the sampling loop.

``step-*`` times one step on latents (B, 4, H, W), with classifier-free
guidance (the model output is the doubled batch [cond; uncond], DiT style) or
without; ``loop50-*`` times a whole 50-step guided ``DDIMSampler`` call. Both
are held against what a user would otherwise run: diffusers'
``DDIMScheduler.step`` written out in plain PyTorch (``plain_pytorch_step``),
and a loop over it. A step does ~20 FLOPs per element, so no FLOP ceiling
applies and the floor is bytes only (``_step_case`` and ``_loop_case`` say
which bytes).
"""
from __future__ import annotations

import functools

import torch

from vqkernels.bench.cases import REFERENCE, Case, usable_backends
from vqkernels.ops import ddim
from vqkernels.reference import ddim as reference
from vqkernels.sampling import DDIMSampler, DDIMScheduler

GPU_SHAPES = ((256, 4, 32, 32), (256, 4, 64, 64))
CPU_SHAPES = ((64, 4, 32, 32), (256, 4, 32, 32))
GUIDANCE_SCALE = 4.0
NUM_STEPS = 50
TIMESTEP = 501  # a mid-schedule step of 50 (leading, steps_offset 1)


def plain_pytorch_step(model_output, timestep, sample, alphas_cumprod, *, step_ratio,
                       guidance_scale=None):
    """diffusers' DDIMScheduler.step (eta 0, epsilon, clip_sample) as plain PyTorch ops."""
    if guidance_scale is not None:
        cond, uncond = model_output.chunk(2)
        model_output = uncond + guidance_scale * (cond - uncond)
    alpha_prod_t = alphas_cumprod[timestep]
    prev_t = timestep - step_ratio
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.ones(())
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    pred_original_sample = pred_original_sample.clamp(-1.0, 1.0)
    pred_sample_direction = (1 - alpha_prod_t_prev) ** 0.5 * model_output
    prev_sample = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    return prev_sample, pred_original_sample


def cases(device: torch.device, quick: bool) -> list[Case]:
    """Steps at every shape x dtype x guidance, then the 50-step loop (quick: first shape, fp32)."""
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    dtypes = (torch.float32, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    if quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    found = [_step_case(device, shape, dtype, guided)
             for shape in shapes for dtype in dtypes for guided in (True, False)]
    return found + [_loop_case(device, shapes[0], guided=True)]


def _table(device):
    table = reference.alphas_cumprod(reference.betas_for_schedule(dtype=torch.float32))
    return table.to(device)


def _step_case(device, shape, dtype, guided) -> Case:
    """One step. The "reference" row is ``plain_pytorch_step`` (~10 elementwise
    launches in the sample's dtype, plus a DiT sampler's guidance combine); the
    fused rows skip ``pred_original_sample``, as a sampling loop would, since it
    does not need it. Bytes: x_t and the model output (2B rows with guidance)
    read once, x_prev written once."""
    b = shape[0]
    sample = torch.randn(shape, device=device, dtype=dtype)
    out = torch.randn((2 * b if guided else b, *shape[1:]), device=device, dtype=dtype)
    table = _table(device)
    scale = GUIDANCE_SCALE if guided else None
    fns = {REFERENCE: functools.partial(plain_pytorch_step, out, TIMESTEP, sample, table,
                                        step_ratio=1000 // NUM_STEPS, guidance_scale=scale)}
    t = torch.full((b,), TIMESTEP, device=device)
    for name in usable_backends(ddim.DISPATCH, device, dtype):
        if name != REFERENCE:
            fns[name] = functools.partial(
                ddim.ddim_step, out, t, sample, table, num_inference_steps=NUM_STEPS,
                clip_sample=True, guidance_scale=scale, return_pred_original=False,
                backend=name)
    itemsize = sample.element_size()
    return Case(op="ddim", shape=f"step-{_label(shape, dtype, guided)}", fns=fns,
                bytes=(out.numel() + 2 * sample.numel()) * itemsize)


class _Identity(torch.nn.Module):
    num_classes = 1000

    def forward(self, x, t, y=None):
        return x


def _plain_loop(model, shape, device, table, labels):
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(NUM_STEPS)
    x = torch.randn(shape, device=device)
    for t in scheduler.timesteps.tolist():
        out = model(torch.cat([x, x]), t, labels)
        x, _ = plain_pytorch_step(out, t, x, table, step_ratio=1000 // NUM_STEPS,
                                  guidance_scale=GUIDANCE_SCALE)
    return x


def _loop_case(device, shape, guided) -> Case:
    """A 50-step ``DDIMSampler`` call with CFG and an identity model, so the time
    is the loop's own (steps, launches, Python): eager and, on CUDA, replaying its
    CUDA graph (captured by the warm-up call, before timing); the "reference" row
    is the plain-PyTorch loop. Bytes: 50 times a step's (x_t, the 2B-row output,
    x_prev), not counting the model's concatenation; working set: one step's,
    since every step rereads the same latents."""
    table = _table(device)
    labels = torch.zeros(shape[0], dtype=torch.int64, device=device)
    model = _Identity()
    fns = {REFERENCE: functools.partial(_plain_loop, model, shape, device, table, labels)}
    kw = dict(num_steps=NUM_STEPS, guidance_scale=GUIDANCE_SCALE, class_labels=labels,
              device=device)
    for name in usable_backends(ddim.DISPATCH, device, torch.float32):
        if name == REFERENCE:
            continue
        fns[name] = functools.partial(DDIMSampler(model, shape, backend=name, **kw), progress=False)
        if device.type == "cuda":  # captured on the first call, replayed on every call
            graph = DDIMSampler(model, shape, backend=name, cuda_graph=True, **kw)
            fns[f"{name}-graph"] = functools.partial(graph, progress=False)
    sample_bytes = torch.Size(shape).numel() * 4
    return Case(op="ddim", shape=f"loop{NUM_STEPS}-{_label(shape, torch.float32, guided)}",
                fns=fns, bytes=NUM_STEPS * 4 * sample_bytes, working_set=4 * sample_bytes)


def _label(shape, dtype, guided) -> str:
    dims = "x".join(map(str, shape))
    return f"{dims}-{str(dtype).removeprefix('torch.')}{'-cfg' if guided else ''}"
