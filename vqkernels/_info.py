"""``vqkernels.info()``: what was built, and what each op dispatches to here."""
from __future__ import annotations

import os
import platform

import torch

from vqkernels import _ext
from vqkernels._dispatch import ENV_VAR
from vqkernels._version import __version__


def _op_dispatches():
    """op -> (its dispatch, the dtype and shape facts info() asks about)."""
    from vqkernels.ops import ddim, timestep
    from vqkernels.ops.attention import DISPATCH as attention_dispatch  # ops.attention: the op

    return {"timestep_embedding": (timestep.DISPATCH, torch.float32, {}),
            "ddim_step": (ddim.DISPATCH, torch.float32, {}),
            "attention (d=72)": (attention_dispatch, torch.float32,
                                 dict(head_dim=72))}


def _devices() -> list[torch.device]:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda", torch.cuda.current_device()))
    return devices


def info_dict() -> dict:
    """Build facts, runtime versions, and per op and device the backend ``auto`` picks."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ops = {}
    for name, (dispatch, dtype, shape) in _op_dispatches().items():
        for device in _devices():
            ops.setdefault(name, {})[device.type] = {
                "auto": dispatch.select("auto", device, dtype, **shape).name,
                "unavailable": {b: r for b, r in dispatch.explain(device, dtype, **shape).items()
                                if r},
            }
    return {
        "vqkernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "extension": _ext.build_info() or {"loaded": False, "error": _ext.LOAD_ERROR},
        "backend_env": os.environ.get(ENV_VAR),
        "ops": ops,
    }


def info(print_it: bool = True) -> dict:
    """Print (and return) what was built and which backend each op uses here."""
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
        lines.append(f"extension vqkernels._C: built against torch {ext['torch_version']}; "
                     f"C++ CPU kernels: yes (OpenMP: {'yes' if ext['openmp'] else 'no'}); {cuda}")
    if data["backend_env"]:
        lines.append(f"{ENV_VAR}={data['backend_env']}")
    for op, per_device in data["ops"].items():
        for device, choice in per_device.items():
            lines.append(f"{op} on {device}: auto -> {choice['auto']}")
            for backend, reasons in choice["unavailable"].items():
                lines.append(f"    {backend}: unavailable ({'; '.join(reasons)})")
    return "\n".join(lines)
