"""The one device guard of every Triton launcher.

A Triton launch runs on the *current* CUDA device, not on its tensors' device:
with tensors on cuda:1 and cuda:0 current it would read the wrong memory or
fault. Each launcher runs its launches inside ``on_device(first_tensor)``.
"""
from __future__ import annotations

import contextlib

import torch


def on_device(t: torch.Tensor):
    """Make ``t``'s CUDA device current for the block (a no-op for CPU tensors: the interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
