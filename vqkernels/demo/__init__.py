"""``python -m vqkernels demo``: a VQ tokenizer and a latent DiT on scikit-learn's digits.

Trains a small VQ tokenizer (``VectorQuantize``: EMA, k-means init, dead-code
restarts) and a class-conditional ``DiT`` on its latents, samples with
``DDIMSampler`` and classifier-free guidance, and judges the samples with a
logistic regression and a Fréchet distance in PCA space, both fit on the real
training digits. Needs scikit-learn (``pip install 'vqkernels[demo]'``).
"""
from vqkernels.demo.config import FULL, QUICK, DemoConfig
from vqkernels.demo.pipeline import run_demo

__all__ = ["FULL", "QUICK", "DemoConfig", "run_demo"]
