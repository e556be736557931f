"""Thin reference VQGAN and DiT models built from vqkernels.nn (arrive with the VQ and attention issues)."""
