"""DDIM scheduler and sampler (arrive with the DDIM issue; the math is in vqkernels.reference.ddim)."""
