"""A small VQ tokenizer for 8x8 digits: conv encoder, ``VectorQuantize``, conv decoder.

The encoder maps (B, 1, 8, 8) images to a (B, C, 4, 4) grid, each position
quantized by ``vqkernels.VectorQuantize`` (EMA codebook, k-means init on the
first batch, dead-code restarts); the decoder maps codes back to pixels. The
twin (``twin=True``) swaps in ``ReferenceVectorQuantize``, the same module on
the pure-PyTorch reference ops, with the same state dict.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vqkernels.demo.config import DemoConfig
from vqkernels.demo.progress import progress_bar
from vqkernels.nn import ReferenceVectorQuantize, VectorQuantize, code_usage


class DigitTokenizer(nn.Module):
    """``images (B, 1, 8, 8) in [0, 1] -> codes (B, 4, 4) -> reconstructions (B, 1, 8, 8)``."""

    def __init__(self, config: DemoConfig, *, twin: bool = False, backend: str | None = None):
        super().__init__()
        width, dim = config.tokenizer_width, config.latent_channels
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width // 2, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, dim, 1))
        vq_options = dict(dim=dim, codebook_size=config.codebook_size,
                          decay=config.codebook_decay, kmeans_init=True,
                          threshold_ema_dead_code=config.dead_code_threshold,
                          accept_image_fmap=True, commitment_weight=config.commitment_weight)
        self.quantizer = (ReferenceVectorQuantize(**vq_options) if twin
                          else VectorQuantize(**vq_options, backend=backend))
        self.decoder = nn.Sequential(
            nn.Conv2d(dim, width, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(width, width // 2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width // 2, width // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width // 2, 1, 3, padding=1))

    def encode(self, images: torch.Tensor):
        """-> (quantized latents (B, C, 4, 4), codes (B, 4, 4), commitment loss)."""
        return self.quantizer(self.encoder(images * 2 - 1))

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Any (B, C, 4, 4) latents snapped to their nearest codes (no codebook update)."""
        training = self.quantizer.training
        self.quantizer.eval()
        try:
            return self.quantizer(latents)[0]
        finally:
            self.quantizer.train(training)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder(latents)

    def forward(self, images: torch.Tensor):
        """-> (reconstructions, codes, commitment loss)."""
        quantized, codes, commit = self.encode(images)
        return self.decode(quantized), codes, commit


def tokenizer_step(tokenizer: DigitTokenizer, optimizer, images: torch.Tensor) -> torch.Tensor:
    """One training step: pixel MSE + commitment loss; the codebook moves by EMA."""
    reconstructions, _, commit = tokenizer(images)
    loss = F.mse_loss(reconstructions, images) + commit
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(model: nn.Module, lr: float, steps: int):
    """AdamW and a cosine decay to 10% of ``lr`` over ``steps``."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1),
                                                          eta_min=0.1 * lr)
    return optimizer, schedule


def train_tokenizer(tokenizer: DigitTokenizer, images: torch.Tensor, config: DemoConfig, *,
                    progress: bool = True) -> float:
    """``config.tokenizer_steps`` steps on random batches of ``images``; the last loss."""
    optimizer, schedule = make_optimizer(tokenizer, config.tokenizer_lr,
                                         config.tokenizer_steps)
    tokenizer.train()
    loss = torch.zeros(())
    bar = progress_bar(config.tokenizer_steps, "tokenizer", enabled=progress)
    for _ in range(config.tokenizer_steps):
        batch = torch.randint(0, images.shape[0], (config.tokenizer_batch,),
                              device=images.device)
        loss = tokenizer_step(tokenizer, optimizer, images[batch])
        schedule.step()
        bar.update(1, loss)
    bar.close()
    tokenizer.eval()
    return float(loss)


@torch.no_grad()
def evaluate_tokenizer(tokenizer: DigitTokenizer, images: torch.Tensor) -> dict:
    """Reconstructions of ``images`` and their MSE, with the codes' perplexity and dead count."""
    tokenizer.eval()
    reconstructions, codes, _ = tokenizer(images)
    reconstructions = reconstructions.clamp(0, 1)
    usage = code_usage(codes.reshape(-1), tokenizer.quantizer.codebook_size)
    return {"reconstructions": reconstructions,
            "mse": float(F.mse_loss(reconstructions, images)),
            "perplexity": float(usage["perplexity"]),
            "dead_codes": int(usage["dead"])}
