"""The demo's sizes, step counts and pass thresholds: ``FULL`` and ``QUICK`` (``--quick``).

``FULL`` is sized for at most 10 minutes on 2 CPU cores, ``QUICK`` for at most
2 minutes (CI): fewer steps and samples, lower thresholds. The README's "Demo"
section reports what ``FULL`` measured.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class DemoConfig:
    """Hyperparameters of one demo run (tokenizer, DiT, sampling) and its thresholds."""

    # VQ tokenizer: 8x8 digits <-> 4x4 grids of latent_channels-dim codes.
    latent_channels: int = 4
    codebook_size: int = 64
    tokenizer_width: int = 32
    tokenizer_steps: int = 1500
    tokenizer_batch: int = 128
    tokenizer_lr: float = 2e-3
    commitment_weight: float = 0.25
    codebook_decay: float = 0.9
    dead_code_threshold: float = 1.0
    # Class-conditional DiT on the 4x4 latent grid, (4 / patch_size)**2 tokens.
    patch_size: int = 2
    hidden_size: int = 96
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    dit_steps: int = 4000
    dit_batch: int = 128
    dit_lr: float = 2e-3
    min_snr_gamma: float = 5.0
    # DDIM sampling with classifier-free guidance.
    samples_per_class: int = 100
    ddim_steps: int = 50
    ddim_eta: float = 1.0
    cfg_scale: float = 1.25
    # Steps timed on vqkernels' modules and on their pure-PyTorch twins, per stage.
    twin_steps: int = 5
    # Pass thresholds.
    min_sample_accuracy: float = 0.95
    min_reconstruction_accuracy: float = 0.90
    max_frechet_ratio: float = 2.5

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


FULL = DemoConfig()
QUICK = dataclasses.replace(
    FULL, tokenizer_steps=600, dit_steps=800, samples_per_class=36, ddim_steps=25,
    twin_steps=2, min_sample_accuracy=0.9, min_reconstruction_accuracy=0.9,
    max_frechet_ratio=8.0)
