"""The DDIM sampling loop (``ddim_sample``, ``DDIMSampler``): no host syncs, optionally one CUDA graph."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from vqkernels import ops


def ddim_sample(
    model,
    shape,
    *,
    num_steps: int = 50,
    guidance_scale: float = 1.0,
    eta: float = 0.0,
    class_labels: torch.Tensor | None = None,
    null_class_label: int | None = None,
    guidance_channels: int | None = None,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    scheduler=None,
    device=None,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    cuda_graph: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Sample ``shape`` = (B, C, ...) latents with ``num_steps`` DDIM steps.

    ``DDIMSampler(model, shape, ...)(latents, generator=generator)``: see
    ``DDIMSampler`` for the arguments. To sample repeatedly at one shape
    (serving), keep a ``DDIMSampler``: with ``cuda_graph=True`` it captures once.
    """
    if device is None and latents is not None:
        device = latents.device
    sampler = DDIMSampler(model, shape, num_steps=num_steps, guidance_scale=guidance_scale,
                          eta=eta, class_labels=class_labels, null_class_label=null_class_label,
                          guidance_channels=guidance_channels, scheduler=scheduler, device=device,
                          dtype=dtype, cuda_graph=cuda_graph, backend=backend)
    return sampler(latents, generator=generator, progress=progress)


class DDIMSampler:
    """The DDIM sampling loop at one shape; device-resident state, no host syncs.

    ``model(x, t)`` (or ``model(x, t, y)`` with ``class_labels`` (B,)) returns
    the prediction for x_t at per-sample timesteps t (B,), with C or more
    channels (DiT's learned sigma is ignored). With ``guidance_scale != 1``
    the model sees the doubled batch ``[x; x]`` with labels ``[y; null]``
    (``null_class_label``, default ``model.num_classes`` as in DiT) and
    ``ops.ddim_step`` combines the halves, on the first ``guidance_channels``
    channels (default all).

    The schedule is ``scheduler``'s (a ``vqkernels.sampling.DDIMScheduler``;
    default ``DDIMScheduler(clip_sample=False)``, DiT's DDIM); its
    ``set_timesteps(num_steps)`` is called here. Each call starts from
    ``latents`` or ``randn(shape)`` drawn from ``generator``; with ``eta > 0``
    step i's noise is drawn in the kernel, keyed by ``seeds[i]`` of a schedule
    ``randint(0, 2**62, (num_steps,))`` drawn next from ``generator``.
    Timesteps, step index, seeds and labels live on the device, so the loop
    never waits for the host.

    ``cuda_graph=True`` (CUDA only): the first call captures one model call
    plus step in a CUDA graph (after a warm-up step on a side stream); every
    call replays it ``num_steps`` times. The model must be capturable (static
    shapes, no host syncs). Results equal the eager loop's.
    """

    def __init__(self, model, shape, *, num_steps: int = 50, guidance_scale: float = 1.0,
                 eta: float = 0.0, class_labels: torch.Tensor | None = None,
                 null_class_label: int | None = None, guidance_channels: int | None = None,
                 scheduler=None, device=None, dtype: torch.dtype = torch.float32,
                 cuda_graph: bool = False, backend: str | None = None):
        from vqkernels.sampling.scheduler import DDIMScheduler

        device = torch.device(device) if device is not None else torch.device("cpu")
        shape = tuple(shape)
        _validate(shape, num_steps, guidance_scale, eta, class_labels, device, cuda_graph)
        self.model, self.shape, self.device, self.dtype = model, shape, device, dtype
        self.guided, self.guidance_scale = guidance_scale != 1.0, guidance_scale
        self.eta, self.guidance_channels, self.backend = eta, guidance_channels, backend
        self.scheduler = scheduler if scheduler is not None else DDIMScheduler(clip_sample=False)
        self.scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = self.scheduler.timesteps.to(device)
        self.table = self.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        self.step_index = torch.arange(len(self.timesteps), device=device)
        self.seeds = torch.zeros(len(self.timesteps), dtype=torch.int64, device=device)
        self.labels = None if class_labels is None else self._labels(class_labels, null_class_label)
        self.cuda_graph, self._graph = cuda_graph, None

    def __call__(self, latents: torch.Tensor | None = None, *,
                 generator: torch.Generator | None = None, progress: bool = True) -> torch.Tensor:
        if latents is not None and tuple(latents.shape) != self.shape:
            raise ValueError(f"latents must have shape {self.shape}, got {tuple(latents.shape)}")
        x = latents.to(device=self.device, dtype=self.dtype) if latents is not None else (
            _on_generator_device(torch.randn, self.shape, generator, self.device, dtype=self.dtype))
        if self.eta > 0:
            self.seeds.copy_(_on_generator_device(torch.randint, self.seeds.shape, generator,
                                                  self.device, low=0, high=2 ** 62))
        steps = tqdm(range(len(self.timesteps)), desc="ddim", disable=not progress, leave=False)
        if self.cuda_graph:
            return self._replay(x, steps)
        for i in steps:
            x = self.step(x, self.step_index[i:i + 1])
        return x

    def _labels(self, class_labels, null_class_label):
        labels = class_labels.to(self.device)
        if not self.guided:
            return labels
        null = null_class_label if null_class_label is not None else getattr(
            self.model, "num_classes", None)
        if null is None:
            raise ValueError("null_class_label is needed for guidance (the model has no "
                             "num_classes attribute)")
        return torch.cat([labels, torch.full_like(labels, null)])

    def step(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """x_t -> x_prev for the step at device ``index`` (1,)."""
        t = self.timesteps.index_select(0, index).expand(self.shape[0])
        x_in, t_in = (torch.cat([x, x]), torch.cat([t, t])) if self.guided else (x, t)
        args = (x_in, t_in) if self.labels is None else (x_in, t_in, self.labels)
        out = self.model(*args)
        config = self.scheduler.config
        prev, _ = ops.ddim_step(
            out, t, x, self.table, num_inference_steps=self.scheduler.num_inference_steps,
            final_alpha_cumprod=float(self.scheduler.final_alpha_cumprod), eta=self.eta,
            prediction_type=config.prediction_type, clip_sample=config.clip_sample,
            clip_sample_range=config.clip_sample_range, thresholding=config.thresholding,
            dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
            sample_max_value=config.sample_max_value,
            guidance_scale=self.guidance_scale if self.guided else None,
            guidance_channels=self.guidance_channels,
            noise_seed=self.seeds.index_select(0, index) if self.eta > 0 else None,
            return_pred_original=False, backend=self.backend)
        return prev

    def _replay(self, x: torch.Tensor, steps) -> torch.Tensor:
        if self._graph is None:
            self._capture(x)
        self._static_x.copy_(x)
        self._index.zero_()
        for _ in steps:
            self._graph.replay()
        return self._static_x.clone()

    def _capture(self, x: torch.Tensor) -> None:
        """One step on static x and step index, captured after a warm-up on a side stream."""
        self._static_x = x.clone()
        self._index = torch.zeros(1, dtype=torch.int64, device=x.device)

        def body():
            self._static_x.copy_(self.step(self._static_x, self._index))
            self._index.add_(1)

        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):  # lazy initialisation stays out of the graph
            body()
        torch.cuda.current_stream(x.device).wait_stream(side)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            body()


def _on_generator_device(draw, size, generator, device, **kwargs):
    """draw(size) from generator on its own device (a CPU generator serves any device)."""
    where = generator.device if generator is not None else device
    return draw(size=size, generator=generator, device=where, **kwargs).to(device)


def _validate(shape, num_steps, guidance_scale, eta, class_labels, device, cuda_graph):
    if len(shape) < 1 or any(not isinstance(s, int) or s < 0 for s in shape):
        raise ValueError(f"shape must be a tuple of non-negative ints (B, C, ...), got {shape}")
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
    if guidance_scale != 1.0 and class_labels is None:
        raise ValueError("guidance_scale != 1 needs class_labels (the conditional model input)")
    if class_labels is not None and tuple(class_labels.shape) != shape[:1]:
        raise ValueError(f"class_labels must have shape ({shape[0]},), got "
                         f"{tuple(class_labels.shape)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta!r}")
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs a CUDA device, got {device}")
