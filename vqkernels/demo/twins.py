"""Each stage's steps timed on vqkernels' modules and on their pure-PyTorch twins.

The twins (``ReferenceVectorQuantize`` in the tokenizer, ``ReferenceDiT``, the
sampler's ``backend="reference"``) hold copies of the trained weights and take
the same inputs; ``twin_steps`` steps of each are timed after one warm-up step,
inside ``torch.random.fork_rng`` so that timing never changes the demo's
random stream or its models.
"""
from __future__ import annotations

import torch

from vqkernels.demo.config import DemoConfig
from vqkernels.demo.diffusion import (build_dit, dit_step, loss_weights, make_sampler,
                                      noise_schedule)
from vqkernels.demo.progress import time_steps
from vqkernels.demo.tokenizer import DigitTokenizer, make_optimizer, tokenizer_step


def _pair(ours_seconds: float, twin_seconds: float, steps: int) -> dict:
    return {"steps": steps, "vqkernels_ms": 1e3 * ours_seconds, "twin_ms": 1e3 * twin_seconds,
            "speedup": twin_seconds / ours_seconds if ours_seconds > 0 else None}


def _devices():
    return [torch.cuda.current_device()] if torch.cuda.is_available() else []


def _time_training(build, state: dict, step, lr: float, config: DemoConfig, device) -> dict:
    """``config.twin_steps`` training steps, ``step(net, optimizer)``, of ``build(twin)`` for
    vqkernels (twin False) and the twin (True), each loaded with ``state``."""
    seconds = []
    with torch.random.fork_rng(devices=_devices()):
        for twin in (False, True):
            net = build(twin).to(device)
            net.load_state_dict(state)
            net.train()
            optimizer, _ = make_optimizer(net, lr, 1)
            seconds.append(time_steps(lambda: step(net, optimizer), config.twin_steps, device))
    return _pair(*seconds, config.twin_steps)


def time_tokenizer(tokenizer: DigitTokenizer, images: torch.Tensor, config: DemoConfig,
                   backend: str | None) -> dict:
    """Training steps of copies of ``tokenizer`` and of its twin on one fixed batch."""
    batch = images[: config.tokenizer_batch]
    return _time_training(lambda twin: DigitTokenizer(config, twin=twin, backend=backend),
                          tokenizer.state_dict(),
                          lambda net, optimizer: tokenizer_step(net, optimizer, batch),
                          config.tokenizer_lr, config, images.device)


def time_dit(model, latents: torch.Tensor, labels: torch.Tensor, config: DemoConfig,
             backend: str | None) -> dict:
    """DDPM training steps of copies of ``model`` and of a ``ReferenceDiT`` with its weights."""
    x, y = latents[: config.dit_batch], labels[: config.dit_batch]
    schedule = noise_schedule()
    weights = loss_weights(schedule, config.min_snr_gamma, latents.device)
    return _time_training(lambda twin: build_dit(config, twin=twin, backend=backend),
                          model.state_dict(),
                          lambda net, optimizer: dit_step(net, optimizer, schedule, x, y, weights),
                          config.dit_lr, config, latents.device)


@torch.no_grad()
def time_sampling(model, labels: torch.Tensor, config: DemoConfig, backend: str | None) -> dict:
    """Guided DDIM steps at the demo's batch: ``DiT`` + the fused step against ``ReferenceDiT``
    + the reference step (the same weights, the same starting latents)."""
    device = labels.device
    twin = build_dit(config, twin=True).to(device).eval()
    twin.load_state_dict(model.state_dict())
    seconds = []
    with torch.random.fork_rng(devices=_devices()):
        x = torch.randn(labels.shape[0], config.latent_channels, 4, 4, device=device)
        for net, step_backend in ((model, backend), (twin, "reference")):
            sampler = make_sampler(net, labels, config, num_steps=config.twin_steps + 1,
                                   backend=step_backend)
            index = iter(range(config.twin_steps + 1))
            state = {"x": x}

            def step():
                i = next(index)
                state["x"] = sampler.step(state["x"], sampler.step_index[i:i + 1])

            seconds.append(time_steps(step, config.twin_steps, device))
    return _pair(*seconds, config.twin_steps)
