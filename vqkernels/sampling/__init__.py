"""DDIM scheduler and sampler, both stepping with the fused vqkernels.ops.ddim_step."""
from vqkernels.sampling.sampler import DDIMSampler, ddim_sample
from vqkernels.sampling.scheduler import DDIMScheduler, DDIMSchedulerOutput

__all__ = ["DDIMSampler", "DDIMScheduler", "DDIMSchedulerOutput", "ddim_sample"]
