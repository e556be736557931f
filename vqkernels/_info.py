"""``vqkernels.info()``: what was built, what each op dispatches to here, and its GPU status."""
from __future__ import annotations

import importlib.metadata
import os
import platform

import torch

from vqkernels import _ext, _verified
from vqkernels._dispatch import ENV_VAR
from vqkernels._version import __version__


def _op_dispatches():
    """label -> (public op, its dispatch, the dtype and shape facts info() asks about)."""
    from vqkernels.ops import (adaln, ddim, ema, gelu, group_normalization, residual, search,
                               timestep)
    from vqkernels.ops.flash_attention import DISPATCH as attention_dispatch

    f32 = torch.float32
    return {
        "timestep_embedding": ("timestep_embedding", timestep.DISPATCH, f32, {}),
        # two D: auto prefers the CUDA kernel up to D = 64 (ops.search)
        "nearest_code (fp32, D=32)": ("nearest_code", search.DISPATCH, f32, dict(dim=32)),
        "nearest_code (fp32, D=256)": ("nearest_code", search.DISPATCH, f32, dict(dim=256)),
        "vector_quantize (fp32, D=256)": ("vector_quantize", search.DISPATCH, f32, dict(dim=256)),
        "nearest_code_with_stats (fp32, D=256)": ("nearest_code_with_stats", search.DISPATCH,
                                                  f32, dict(dim=256)),
        "residual_nearest_code (fp32, D=128)": ("residual_nearest_code", residual.DISPATCH, f32,
                                                dict(dim=128)),
        "code_counts_and_sums (fp32)": ("code_counts_and_sums", ema.STATS_DISPATCH, f32, {}),
        "ema_update_ (fp32 z and codebook)": ("ema_update_", ema.DISPATCH, f32,
                                              dict(codebook_dtype=f32)),
        "ema_update_stages_ (fp32 codebooks)": ("ema_update_stages_", ema.STAGES_DISPATCH, f32,
                                                dict(codebook_dtype=f32)),
        "attention (fp32, d=72)": ("attention", attention_dispatch, f32, dict(head_dim=72)),
        "ddim_step (fp32)": ("ddim_step", ddim.DISPATCH, f32, {}),
        "layer_norm_modulate (fp32)": ("layer_norm_modulate", adaln.NORM_DISPATCH, f32, {}),
        "gated_residual (fp32)": ("gated_residual", adaln.RESIDUAL_DISPATCH, f32, {}),
        "gated_residual_layer_norm_modulate (fp32)": ("gated_residual_layer_norm_modulate",
                                                      adaln.FUSED_DISPATCH, f32, {}),
        "gelu_tanh (fp32)": ("gelu_tanh", gelu.DISPATCH, f32, {}),
        "group_norm (fp32)": ("group_norm", group_normalization.DISPATCH, f32, {}),
    }


# How the C++ CPU search ranks fp32 codes on this processor (csrc/cpu/search_screen.h).
SEARCH_PATHS = {True: "bf16 screen + fp32 re-score (AVX512-BF16)", False: "fp32 GEMM"}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def versions() -> dict:
    """python, torch, triton (None if not installed) and vqkernels versions; vqkernels' as
    installed (0.1.0+cu130: the CUDA its kernels were built for) when it is."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        installed = importlib.metadata.version("vqkernels")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path
        installed = __version__
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "vqkernels": installed}


def gpu_status() -> dict[str, dict[str, str]]:
    """Per public op and GPU backend: "verified on <device> (sm_XY), <date>", or not yet run."""
    return {op: {backend: _verified.gpu_status(dispatch.op, backend)
                 for backend in _verified.GPU_BACKENDS if backend in dispatch.backends}
            for op, dispatch, _, _ in _op_dispatches().values()}


def info_dict() -> dict:
    """Build facts, runtime versions, per op and device the backend ``auto`` picks, GPU status."""
    ops = {}
    for label, (_, dispatch, dtype, shape) in _op_dispatches().items():
        for device in _devices():
            ops.setdefault(label, {})[device.type] = {
                "auto": dispatch.select("auto", device, dtype, **shape).name,
                "unavailable": {b: r for b, r in dispatch.explain(device, dtype, **shape).items()
                                if r},
            }
    found = versions()
    return {
        "vqkernels": found["vqkernels"],
        "python": found["python"],
        "torch": found["torch"],
        "triton": found["triton"],
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": _ext.build_info() or {"loaded": False, "error": _ext.LOAD_ERROR},
        "backend_env": os.environ.get(ENV_VAR),
        "ops": ops,
        "gpu_status": gpu_status(),
    }


def info(print_it: bool = True) -> dict:
    """Print (and return) what was built, which backend each op uses here, and its GPU status."""
    data = info_dict()
    if print_it:
        print(format_info(data))
    return data


def format_info(data: dict) -> str:
    ext = data["extension"]
    lines = [
        f"vqkernels {data['vqkernels']}  python {data['python']}  torch {data['torch']}  "
        f"triton {data['triton'] or 'not installed'}",
        f"GPU: {data['gpu'] or 'none'}",
    ]
    if ext.get("loaded") is False:
        lines.append(f"extension vqkernels._C: NOT LOADED ({ext['error']})")
    else:
        cuda = (f"CUDA kernels: yes (CUDA {ext['cuda_version']}, archs {ext['cuda_archs']})"
                if ext["cuda"] else "CUDA kernels: no")
        lines.append(f"extension vqkernels._C: built with torch {ext['torch_version']} for torch "
                     f">= {ext['torch_target']} (stable ABI); "
                     f"C++ CPU kernels: yes (OpenMP: {'yes' if ext['openmp'] else 'no'}; "
                     f"fp32 search: {SEARCH_PATHS[ext['cpu_search_screen']]}); {cuda}")
    if data["backend_env"]:
        lines.append(f"{ENV_VAR}={data['backend_env']}")
    for op, per_device in data["ops"].items():
        for device, choice in per_device.items():
            lines.append(f"{op} on {device}: auto -> {choice['auto']}")
            for backend, reasons in choice["unavailable"].items():
                lines.append(f"    {backend}: unavailable ({'; '.join(reasons)})")
    lines.append("On a GPU (vqkernels._verified; auto on CUDA prefers verified backends, "
                 "then Triton):")
    for op, statuses in data["gpu_status"].items():
        lines.append(f"    {op}: " + "; ".join(f"{'triton on cuda' if b == 'triton' else b}: {s}"
                                                 for b, s in statuses.items()))
    return "\n".join(lines)
