"""Latent diffusion in miniature: a class-conditional ``DiT`` on the tokenizer's latents.

Training is DDPM's epsilon prediction on the standard linear beta schedule
(1000 steps, 1e-4 to 0.02: ``DDIMScheduler``'s tables), with DiT's class
dropout so that one model serves classifier-free guidance; sampling is
``DDIMSampler``. The latents are the quantized (B, C, 4, 4) grids, normalized
per channel; samples are un-normalized, snapped to their nearest codes by the
VQ layer and decoded. The loss may weight each t by min(SNR, gamma) / SNR
("min-SNR", Hang et al. 2023), still an epsilon prediction: at equal steps it
gave samples closer to the data here than the plain mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vqkernels.demo.config import DemoConfig
from vqkernels.demo.data import NUM_CLASSES
from vqkernels.demo.progress import progress_bar
from vqkernels.demo.tokenizer import make_optimizer
from vqkernels.models import DiT, ReferenceDiT
from vqkernels.sampling import DDIMSampler, DDIMScheduler

LATENT_SIZE = 4


@dataclass(frozen=True)
class LatentScaler:
    """Per-channel mean and std (1, C, 1, 1) of the training latents."""

    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, latents: torch.Tensor) -> "LatentScaler":
        return cls(latents.mean(dim=(0, 2, 3), keepdim=True),
                   latents.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents - self.mean) / self.std

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents * self.std + self.mean


def noise_schedule() -> DDIMScheduler:
    """The linear schedule of DDPM and DiT; no x0 clipping (latents are not in [-1, 1])."""
    return DDIMScheduler(beta_schedule="linear", clip_sample=False)


def build_dit(config: DemoConfig, *, twin: bool = False, backend: str | None = None):
    """``DiT`` (or its pure-PyTorch twin ``ReferenceDiT``) over the 4x4 latent grid, predicting
    epsilon only (no learned sigma)."""
    args = (LATENT_SIZE, config.patch_size, config.latent_channels, config.hidden_size,
            config.depth, config.num_heads, config.mlp_ratio, config.class_dropout_prob,
            NUM_CLASSES, False)
    return ReferenceDiT(*args) if twin else DiT(*args, backend=backend)


def loss_weights(schedule: DDIMScheduler, min_snr_gamma: float, device) -> torch.Tensor | None:
    """Per-timestep weights min(SNR_t, gamma) / SNR_t, SNR_t = a_t / (1 - a_t) (None: gamma 0)."""
    if min_snr_gamma <= 0:
        return None
    alpha = schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    snr = alpha / (1 - alpha)
    return snr.clamp(max=min_snr_gamma) / snr


def dit_step(model, optimizer, schedule: DDIMScheduler, latents: torch.Tensor,
             labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """One DDPM step: noise ``latents`` to a random t, regress the noise (the mean squared
    error, each sample's weighted by ``weights[t]`` when given)."""
    noise = torch.randn_like(latents)
    t = torch.randint(0, schedule.config.num_train_timesteps, (latents.shape[0],),
                      device=latents.device)
    prediction = model(schedule.add_noise(latents, noise, t), t, labels)
    loss = F.mse_loss(prediction, noise, reduction="none").flatten(1).mean(1)
    loss = (loss if weights is None else loss * weights[t]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_dit(model, latents: torch.Tensor, labels: torch.Tensor, config: DemoConfig, *,
              progress: bool = True):
    """``config.dit_steps`` steps on random batches of normalized ``latents``, the learning
    rate decaying on a cosine; leaves the model in eval mode and returns the last loss."""
    schedule = noise_schedule()
    weights = loss_weights(schedule, config.min_snr_gamma, latents.device)
    optimizer, lr_schedule = make_optimizer(model, config.dit_lr, config.dit_steps)
    model.train()
    loss = torch.zeros(())
    bar = progress_bar(config.dit_steps, "DiT", enabled=progress)
    for _ in range(config.dit_steps):
        batch = torch.randint(0, latents.shape[0], (config.dit_batch,), device=latents.device)
        loss = dit_step(model, optimizer, schedule, latents[batch], labels[batch], weights)
        lr_schedule.step()
        bar.update(1, loss)
    bar.close()
    model.eval()
    return float(loss)


def sample_labels(config: DemoConfig, device) -> torch.Tensor:
    """``samples_per_class`` of each class, grouped by class: (10 * samples_per_class,)."""
    return torch.arange(NUM_CLASSES, device=device).repeat_interleave(config.samples_per_class)


def make_sampler(model, labels: torch.Tensor, config: DemoConfig, *, num_steps: int | None = None,
                 backend: str | None = None) -> DDIMSampler:
    """DDIM (``config.ddim_eta``) with classifier-free guidance at ``config.cfg_scale``; the null
    class is 10."""
    shape = (labels.shape[0], config.latent_channels, LATENT_SIZE, LATENT_SIZE)
    return DDIMSampler(model, shape, num_steps=num_steps or config.ddim_steps,
                       guidance_scale=config.cfg_scale, eta=config.ddim_eta, class_labels=labels,
                       scheduler=noise_schedule(), device=labels.device, backend=backend)


@torch.no_grad()
def sample_images(model, tokenizer, scaler: LatentScaler, labels: torch.Tensor,
                  config: DemoConfig, *, backend: str | None = None,
                  progress: bool = True) -> torch.Tensor:
    """Images (B, 1, 8, 8) in [0, 1] for ``labels``: DDIM latents -> nearest codes -> decoder."""
    latents = make_sampler(model, labels, config, backend=backend)(progress=progress)
    codes = tokenizer.quantize(scaler.denormalize(latents))
    return tokenizer.decode(codes).clamp(0, 1)
