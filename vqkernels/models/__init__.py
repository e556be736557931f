"""Thin reference models on vqkernels' kernels: DiT, taming's VQGAN and LlamaGen's VQ-16."""
from vqkernels.models.dit import DiT, DiT_models, ReferenceDiT, load_dit_checkpoint
from vqkernels.models.dit_diffusers import dit_from_diffusers, dit_to_diffusers
from vqkernels.models.llamagen import LlamaGenVQ, ReferenceLlamaGenVQ
from vqkernels.models.vqgan import VQGAN, ReferenceVQGAN

__all__ = ["DiT", "DiT_models", "LlamaGenVQ", "ReferenceDiT", "ReferenceLlamaGenVQ",
           "ReferenceVQGAN", "VQGAN", "dit_from_diffusers", "dit_to_diffusers",
           "load_dit_checkpoint"]
