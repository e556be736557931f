"""Benchmark cases of whole models (issue 15): DiT sampling and training, the VQ tokenizers.

``dit-*``: ``models.DiT`` (the "vqkernels" row) against plain-PyTorch twins with the same
weights: ``ReferenceDiT`` ("reference": explicit-softmax attention), ``sdpa-eager`` (the
twin on ``F.scaled_dot_product_attention``, as timm's DiT runs) and "compiled"
(``torch.compile`` of sdpa-eager; left out under --quick). ``ddimN-cfg4``: an N-step DDIM
sample with CFG 4 (``DDIMSampler``; the twins step with the reference ``ddim_step``) in
images/s; ``fwd``: a forward; ``fwdbwd``: a training step. FLOPs: ``dit_flops``.
``vqgan-f16-16384-*`` / ``llamagen-vq16-*``: ``tokenize`` (images to codes) and ``quantize``
(the codebook search on the encoder output) against the reference twin and "original"
(the twin on the matmul-expansion search its repository runs). ``gn-silu-nchw`` /
``gn-silu-nhwc``: ``ops.group_norm(silu=True)`` on a tokenizer's first-level activations
against eager ``F.silu(F.group_norm(...))`` (and its torch.compile) in the same layout.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vqkernels.bench.adaln import block_flops
from vqkernels.bench.cases import (COMPILED, REFERENCE, Case, compiled_contender,
                                   eager_compiled_and_kernels, forward_only, sort_out)
from vqkernels.bench.quantizer import TamingVectorQuantizer2
from vqkernels.models import (VQGAN, DiT, DiT_models, LlamaGenVQ, ReferenceDiT,
                              ReferenceLlamaGenVQ, ReferenceVQGAN)
from vqkernels.models.vqgan import IMAGENET_F16_DDCONFIG
from vqkernels.nn import ReferenceAttention, ReferenceDiTBlock
from vqkernels.ops import group_normalization
from vqkernels.sampling import DDIMSampler

OURS, SDPA_EAGER, ORIGINAL = "vqkernels", "sdpa-eager", "original"
INPUT_SIZE, LATENT_CHANNELS, NUM_CLASSES = 32, 4, 1000  # 256 px images in an f8 latent space
NUM_TIMESTEPS = 1000
GUIDANCE_SCALE = 4.0
GPU_SAMPLE = ("DiT-XL/2", 64, 50)  # (preset, batch, DDIM steps)
GPU_TRAIN = ("DiT-XL/2", 32)  # the release's per-GPU batch: 256 over 8 GPUs
CPU_FORWARD = ("DiT-S/2", 4)  # a few seconds on 2 cores
QUICK_SAMPLE = ("DiT-tiny/4", 1, 2)  # two steps
# DiT_models' presets and, for --quick, one block with two heads of 72 (as DiT-XL/2)
DIT_PRESETS = {**{name: build.keywords for name, build in DiT_models.items()},
               "DiT-tiny/4": dict(depth=1, hidden_size=144, patch_size=4, num_heads=2)}
GPU_IMAGES, CPU_IMAGES, QUICK_IMAGES = (32, 3, 256, 256), (2, 3, 128, 128), (1, 3, 32, 32)
# a tokenizer's first level: ch = 128 at the images' resolution; taming's 32 groups
GN_GROUPS, GN_SHAPES = 32, {"cuda": (32, 128, 256, 256), "cpu": (2, 128, 128, 128)}


def cases(device: torch.device, quick: bool) -> list[Case]:
    """On a GPU (bf16 DiT, fp32 tokenizers) DiT-XL/2 sampling and training and both
    tokenizers at 256 px; on a CPU (fp32) a DiT-S/2 forward and both tokenizers at 128 px;
    quick: a 2-step sample of a one-block DiT and a tiny LlamaGen tokenizing, without
    torch.compile or the "original" tokenizer."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        return [dit_sample_case(*QUICK_SAMPLE, dtype, device, compiled=False),
                *tokenizer_cases("llamagen-tiny", QUICK_IMAGES, device, quick=True)]
    if device.type == "cuda":
        return [dit_sample_case(*GPU_SAMPLE, dtype, device, compiled=True),
                dit_step_case(*GPU_TRAIN, dtype, device, backward=True, compiled=True),
                *tokenizer_cases("vqgan-f16-16384", GPU_IMAGES, device),
                *tokenizer_cases("llamagen-vq16", GPU_IMAGES, device),
                *group_norm_cases(GN_SHAPES["cuda"], dtype, device)]
    return [dit_step_case(*CPU_FORWARD, dtype, device, backward=False, compiled=True),
            *tokenizer_cases("llamagen-vq16", CPU_IMAGES, device),
            *tokenizer_cases("vqgan-f16-16384", CPU_IMAGES, device),
            *group_norm_cases(GN_SHAPES["cpu"], dtype, device)]


class _SdpaAttention(ReferenceAttention):
    def _attend(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _SdpaDiTBlock(ReferenceDiTBlock):
    def _attention(self, hidden_size, num_heads, backend):
        return _SdpaAttention(hidden_size, num_heads, qkv_bias=True)


class SdpaDiT(ReferenceDiT):
    """``ReferenceDiT`` with attention by ``F.scaled_dot_product_attention``: the DiT a
    user runs (timm's ``Attention`` calls it)."""

    def _block(self, hidden_size, num_heads, mlp_ratio, backend):
        return _SdpaDiTBlock(hidden_size, num_heads, mlp_ratio)


def dit_models(preset: str, dtype: torch.dtype, device: torch.device) -> dict[str, nn.Module]:
    """``DIT_PRESETS[preset]`` at input 32 as "reference" (``ReferenceDiT``), "sdpa-eager"
    (``SdpaDiT``) and "vqkernels" (``DiT``) with one set of weights, in eval mode (no
    label dropout). Trainable parameters are drawn from N(0, 0.02^2): DiT's zero init
    would make every block the identity."""
    config = {**DIT_PRESETS[preset], "input_size": INPUT_SIZE}
    with torch.device(device):
        models = {REFERENCE: ReferenceDiT(**config), SDPA_EAGER: SdpaDiT(**config),
                  OURS: DiT(**config)}
    with torch.no_grad():
        for parameter in models[OURS].parameters():
            if parameter.requires_grad:
                parameter.normal_(std=0.02)
    for model in models.values():
        model.load_state_dict(models[OURS].state_dict())
        model.to(dtype).eval()
    return models


def dit_flops(model: DiT, batch: int, *, backward: bool = False) -> int:
    """FLOPs of ``model`` on ``batch`` latents: every linear layer (the patch embedding is
    a linear map on patches) and attention's two matmuls; elementwise work is not counted.

    ``backward``: a training step, the forward plus twice it for the gradients, less the
    input gradients of the patch embedding and the timestep MLP's first layer (their
    inputs need none, so autograd skips them).
    """
    proj, blocks = model.x_embedder.proj, model.blocks
    d, tokens = proj.out_channels, model.grid_size ** 2
    patch = proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    first = 2 * batch * (tokens * patch + model.t_embedder.frequency_embedding_size) * d
    head = model.final_layer.linear.out_features
    forward = (first + 2 * batch * d * d  # + the timestep MLP's second layer
               + len(blocks) * block_flops((batch, tokens, d), blocks[0].mlp.fc1.out_features)
               + 2 * batch * d * 2 * d + 2 * batch * tokens * d * head)  # the final layer
    return 3 * forward - first if backward else forward


def _dit_bytes(model: DiT, batch: int, *, backward: bool = False) -> int:
    """Least bytes of one model call: the parameters read (a training step reads them again
    and writes their gradients), the latents read, the prediction written (and its
    gradient read)."""
    itemsize = model.pos_embed.element_size()
    params = sum(p.numel() for p in model.parameters())
    latents = batch * model.in_channels * (model.grid_size * model.patch_size) ** 2
    prediction = latents * model.out_channels // model.in_channels
    if backward:
        return itemsize * (3 * params + latents + 2 * prediction)
    return itemsize * (params + latents + prediction)


def _dit_rows(preset: str, dtype: torch.dtype, device: torch.device, make_run: Callable,
              compiled: bool) -> tuple[dict, dict, DiT]:
    """``make_run(model, ddim_backend)`` of each of ``dit_models`` and of the compiled
    sdpa-eager where it compiles (the twins step with the reference ``ddim_step``); the
    skipped rows; our model."""
    models = dit_models(preset, dtype, device)
    fns = {name: make_run(model, None if name == OURS else REFERENCE)
           for name, model in models.items()}
    contenders, skipped = compiled_contender(lambda model: make_run(model, REFERENCE),
                                             models[SDPA_EAGER], compiled)
    fns, skipped = sort_out(fns, contenders, skipped)
    return fns, skipped, models[OURS]


def dit_sample_case(preset: str, batch: int, steps: int, dtype: torch.dtype,
                    device: torch.device, *, compiled: bool) -> Case:
    """``steps`` DDIM steps with CFG on ``batch`` random latents and labels: each step
    runs the model on 2 x ``batch`` (conditional and null labels). The rate is images/s;
    FLOPs and bytes are those of the ``steps`` model calls (not the DDIM step's)."""
    latents = torch.randn(batch, LATENT_CHANNELS, INPUT_SIZE, INPUT_SIZE, device=device,
                          dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES, (batch,), device=device)

    def make_run(model, backend):
        sampler = DDIMSampler(model, latents.shape, num_steps=steps,
                              guidance_scale=GUIDANCE_SCALE, class_labels=labels,
                              null_class_label=NUM_CLASSES, device=device, dtype=dtype,
                              backend=backend)
        return functools.partial(forward_only, functools.partial(sampler, progress=False),
                                 (latents,))

    fns, skipped, fast = _dit_rows(preset, dtype, device, make_run, compiled)
    what = f"{_dit_name(preset)}-ddim{steps}-cfg{GUIDANCE_SCALE:g}"
    return Case(op="models", shape=_label(what, latents.shape, dtype), fns=fns, skipped=skipped,
                baselines=(SDPA_EAGER, COMPILED), items=batch,
                bytes=steps * _dit_bytes(fast, 2 * batch), flops=steps * dit_flops(fast, 2 * batch),
                flop_dtype=_flop_dtype(dtype))


def dit_step_case(preset: str, batch: int, dtype: torch.dtype, device: torch.device, *,
                  backward: bool, compiled: bool) -> Case:
    """A forward on ``batch`` random latents, timesteps and labels; ``backward``: a training
    step, the gradients of every trainable parameter for a random upstream gradient."""
    x = torch.randn(batch, LATENT_CHANNELS, INPUT_SIZE, INPUT_SIZE, device=device, dtype=dtype)
    args = (x, torch.randint(0, NUM_TIMESTEPS, (batch,), device=device),
            torch.randint(0, NUM_CLASSES, (batch,), device=device))
    upstream = torch.randn(batch, 2 * LATENT_CHANNELS, INPUT_SIZE, INPUT_SIZE, device=device,
                           dtype=dtype)

    def make_run(model, backend):
        if backward:
            return functools.partial(_train_step, model, args, upstream)
        return functools.partial(forward_only, model, args)

    fns, skipped, fast = _dit_rows(preset, dtype, device, make_run, compiled)
    what = f"{_dit_name(preset)}-{'fwdbwd' if backward else 'fwd'}"
    return Case(op="models", shape=_label(what, x.shape, dtype), fns=fns, skipped=skipped,
                baselines=(SDPA_EAGER, COMPILED), items=batch,
                bytes=_dit_bytes(fast, batch, backward=backward),
                flops=dit_flops(fast, batch, backward=backward), flop_dtype=_flop_dtype(dtype))


def _train_step(model, args, upstream):
    parameters = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(model(*args), parameters, upstream)


class LlamaGenMatmulQuantizer(TamingVectorQuantizer2):
    """LlamaGen's own quantizer: l2-normalized z and codes through taming's matmul expansion."""

    def _quantize(self, z):
        return self.matmul_search(F.normalize(z, dim=-1),
                                  F.normalize(self.embedding.weight, dim=-1))


@dataclass(frozen=True)
class Tokenizer:
    """A tokenizer preset: vqkernels' model, its plain-PyTorch twin (one state dict), and
    ``original_search(n_e, e_dim)``, the quantizer its repository runs."""

    fast: Callable[[], nn.Module]
    twin: Callable[[], nn.Module]
    original_search: Callable[[int, int], nn.Module]


_TINY_LLAMAGEN = dict(codebook_size=1024, codebook_embed_dim=8, encoder_ch_mult=(1, 2),
                      decoder_ch_mult=(1, 2), z_channels=32, ch=32, num_res_blocks=1)
_LLAMAGEN_SEARCH = functools.partial(LlamaGenMatmulQuantizer, beta=0.25, legacy=False)
TOKENIZERS = {
    "vqgan-f16-16384": Tokenizer(functools.partial(VQGAN.imagenet_f16, 16384),
                                 functools.partial(ReferenceVQGAN, IMAGENET_F16_DDCONFIG, 16384,
                                                   256),
                                 functools.partial(TamingVectorQuantizer2, beta=0.25)),
    "llamagen-vq16": Tokenizer(LlamaGenVQ.vq_16, ReferenceLlamaGenVQ, _LLAMAGEN_SEARCH),
    "llamagen-tiny": Tokenizer(functools.partial(LlamaGenVQ, **_TINY_LLAMAGEN),
                               functools.partial(ReferenceLlamaGenVQ, **_TINY_LLAMAGEN),
                               _LLAMAGEN_SEARCH),
}


def tokenizer_models(name: str, device: torch.device, *,
                     original: bool = True) -> dict[str, nn.Module]:
    """``TOKENIZERS[name]`` as "reference" (the twin), "original" (the twin on its
    repository's search; only if ``original``) and "vqkernels", one set of weights, in
    eval mode."""
    spec = TOKENIZERS[name]
    with torch.device(device):
        models = {REFERENCE: spec.twin(), **({ORIGINAL: spec.twin()} if original else {}),
                  OURS: spec.fast()}
        for model in models.values():
            model.load_state_dict(models[OURS].state_dict())
            model.eval()
        if original:
            _swap_search(models[ORIGINAL], spec.original_search)
    return models


def _swap_search(model: nn.Module, search: Callable[[int, int], nn.Module]) -> None:
    codes = model.quantize.embedding
    model.quantize = search(codes.num_embeddings, codes.embedding_dim).eval()
    model.quantize.embedding = codes


def tokenizer_cases(name: str, images_shape: tuple[int, ...], device: torch.device, *,
                    quick: bool = False) -> list[Case]:
    """Tokenizing random fp32 images (encoder, quant_conv, search; the rate is images/s) and
    the quantize stage alone on the encoder's output; ``quick``: tokenizing only, without
    the "original" row.

    FLOPs: tokenize's as ``FlopCounterMode`` counts the "original" model on the meta device
    (convolutions, attention, the search's 2 N K D); quantize: 2 N K D. Bytes: parameters
    and images, or z and the codebook, read; z_q (quantize) and the int64 codes written.
    """
    models = tokenizer_models(name, device, original=not quick)
    fast, images = models[OURS], torch.randn(images_shape, device=device)
    with torch.no_grad():
        z = fast.quant_conv(fast.encoder(images))
    n, (k, d) = z.numel() // z.shape[1], fast.quantize.embedding.weight.shape
    params = sum(p.numel() for p in fast.parameters())

    def rows(stage, tensor):
        return {row: functools.partial(forward_only, getattr(model, stage), (tensor,))
                for row, model in models.items()}

    tokenize = Case(op="models", shape=_label(f"{name}-tokenize", images.shape, images.dtype),
                    fns=rows("tokenize", images), baselines=(ORIGINAL,), items=images_shape[0],
                    bytes=4 * (params + images.numel()) + 8 * n,
                    flops=_tokenize_flops(name, images_shape), flop_dtype=_conv_flop_dtype(device))
    if quick:
        return [tokenize]
    return [tokenize, Case(op="models", shape=_label(f"{name}-quantize", z.shape, z.dtype),
                           fns=rows("quantize", z), baselines=(ORIGINAL,),
                           bytes=4 * (2 * n * d + k * d) + 8 * n, flops=2 * n * k * d,
                           flop_dtype="fp32")]


def eager_group_norm_silu(x, weight, bias):
    return F.silu(F.group_norm(x, GN_GROUPS, weight, bias, eps=1e-6))


def _group_norm_silu(backend: str) -> Callable:
    def run(x, weight, bias):
        return group_normalization.group_norm(x, GN_GROUPS, weight, bias, eps=1e-6, silu=True,
                                              backend=backend)
    return run


def group_norm_cases(shape: tuple[int, ...], dtype: torch.dtype,
                     device: torch.device) -> list[Case]:
    """GroupNorm + SiLU forward on x ``shape``, NCHW and channels-last: eager PyTorch (the
    reference row), its torch.compile, and each usable backend of ``ops.group_norm``. It
    reads x and writes y at least once: 2 x numel elements."""
    found = []
    for layout, memory_format in (("nchw", torch.contiguous_format),
                                  ("nhwc", torch.channels_last)):
        x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        args = (x, torch.randn(shape[1], device=device, dtype=dtype),
                torch.randn(shape[1], device=device, dtype=dtype))
        fns, skipped = eager_compiled_and_kernels(
            lambda fn: functools.partial(forward_only, fn, args), eager_group_norm_silu,
            _group_norm_silu, group_normalization.DISPATCH, device, dtype, compiled=True)
        found.append(Case(op="models", shape=_label(f"gn-silu-{layout}", shape, dtype),
                          fns=fns, skipped=skipped, baselines=(COMPILED,),
                          bytes=2 * x.numel() * x.element_size()))
    return found


def _tokenize_flops(name: str, images_shape: tuple[int, ...]) -> int:
    spec = TOKENIZERS[name]
    with torch.device("meta"):
        model = spec.twin().eval()
        _swap_search(model, spec.original_search)
        images = torch.empty(images_shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.tokenize(images)
    return counter.get_total_flops()


def _conv_flop_dtype(device: torch.device) -> str:
    """The ceiling of fp32 convolutions: TF32 where cuDNN may use it (PyTorch's default)."""
    return "tf32" if device.type == "cuda" and torch.backends.cudnn.allow_tf32 else "fp32"


def _flop_dtype(dtype: torch.dtype) -> str:
    return "bf16" if dtype == torch.bfloat16 else "fp32"


def _dit_name(preset: str) -> str:
    """"DiT-XL/2" -> "dit-xl2"."""
    return preset.lower().replace("/", "")


def _label(what: str, shape, dtype: torch.dtype) -> str:
    """A row's shape cell, e.g. ``dit-xl2-ddim50-cfg4-64x4x32x32-bfloat16`` (targets match it)."""
    return f"{what}-{'x'.join(map(str, shape))}-{str(dtype).removeprefix('torch.')}"
