"""A drop-in ``diffusers.DDIMScheduler`` whose ``step`` is the fused ``vqkernels.ops.ddim_step``."""
from __future__ import annotations

import inspect
import numbers
import operator
from dataclasses import dataclass, fields

import torch

from vqkernels import ops
from vqkernels.reference import ddim as reference


@dataclass
class DDIMSchedulerOutput:
    """What ``DDIMScheduler.step`` returns, indexable like diffusers' ``BaseOutput``.

    ``out[0]`` / ``out["prev_sample"]`` is ``prev_sample`` (``x_{t-1}``, the
    next model input), ``out[1]`` is ``pred_original_sample`` (the predicted
    ``x0``); ``to_tuple()`` gives the fields that are not None, in order.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None

    def _items(self) -> dict:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: value for name, value in values.items() if value is not None}

    def to_tuple(self) -> tuple:
        return tuple(self._items().values())

    def __getitem__(self, key):
        return self._items()[key] if isinstance(key, str) else self.to_tuple()[key]


class SchedulerConfig(dict):
    """The constructor arguments: a read-only dict with attribute access (diffusers' FrozenDict)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"scheduler config has no {name!r}") from None

    def _read_only(self, *args, **kwargs):
        raise TypeError("the scheduler config is read-only (the tables are built from it); "
                        "make a new scheduler with DDIMScheduler.from_config(config, **changes)")

    __setitem__ = __delitem__ = __setattr__ = __delattr__ = __ior__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):  # copy and pickle rebuild it without item assignment
        return type(self), (dict(self),)


class DDIMScheduler:
    """diffusers' ``DDIMScheduler`` (0.42.1: same arguments, attributes, timesteps and
    results) with ``step`` run by the fused ``vqkernels.ops.ddim_step``.

    The tables (``betas``, ``alphas``, ``alphas_cumprod``, float32) and
    ``timesteps`` come from ``vqkernels.reference.ddim``, which reproduces
    diffusers' bit for bit. ``set_timesteps(n, device)`` keeps a float32 copy
    of ``alphas_cumprod`` on ``device``, so that ``step`` on that device
    neither syncs with the host nor uploads the table again. ``backend``
    (not part of the config) picks the ``ops.ddim_step`` backend: "auto" /
    None, "reference", "cpu", "cuda", "triton".

    Beyond diffusers: ``timestep`` may be a ``(B,)`` integer tensor (each
    sample at its own step; on the sample's device without a host sync), or
    an integral float / float tensor (converted); the model output may carry
    more channels than the sample (DiT's learned sigma; the first C are used).

    Deliberate differences from diffusers:

    - Noise: with ``eta > 0`` and no ``variance_noise`` the kernel draws it
      from Philox keyed by a seed taken from ``generator``: the same N(0, 1)
      distribution and reproducible per seed, but not the stream of diffusers'
      ``randn_tensor``. Pass ``variance_noise`` to reproduce diffusers exactly.
    - Precision: ``step``, ``add_noise`` and ``get_velocity`` compute in
      float32 for float16 / bfloat16 inputs (diffusers computes in the input
      dtype, and for a float16 model output with a float32 sample rounds the
      noise direction to float16); outputs have the sample's dtype and are
      contiguous.
    - ``step`` clamps the radicand of ``sqrt(1 - a_prev - std^2)`` at 0 where
      rounding makes it negative (diffusers returns NaN there).
    - ``"trailing"`` spacing always gives exactly ``n`` timesteps; for some
      ``n`` (T = 1000: 61, 103, ...) diffusers gives ``n + 1`` ending in -1.
    - An unknown ``beta_schedule`` raises ``ValueError`` (diffusers:
      ``NotImplementedError``); the config is a read-only dict, not a
      ``FrozenDict``; ``alphas_cumprod`` stays on the CPU (diffusers'
      ``add_noise`` moves it to the sample's device); ``from_config`` raises
      ``TypeError`` on an unknown override (diffusers warns). There is no
      ``from_pretrained`` / ``save_config``.
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas=None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        *,
        backend: str | None = None,
    ):
        self.config = SchedulerConfig(
            num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
            beta_schedule=beta_schedule, trained_betas=trained_betas, clip_sample=clip_sample,
            set_alpha_to_one=set_alpha_to_one, steps_offset=steps_offset,
            prediction_type=prediction_type, thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range, sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing, rescale_betas_zero_snr=rescale_betas_zero_snr)
        self.backend = backend
        self.betas = reference.betas_for_schedule(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
            rescale_betas_zero_snr, dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = reference.alphas_cumprod(self.betas)
        self.final_alpha_cumprod = reference.final_alpha_cumprod(self.alphas_cumprod,
                                                                 set_alpha_to_one)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.int64)
        self._tables, self._table_source, self._table_version = {}, None, -1

    @classmethod
    def from_config(cls, config, **overrides) -> "DDIMScheduler":
        """A scheduler from a config dict (ours, or diffusers' of any scheduler).

        Keys starting with ``_`` and keys that are not DDIM arguments are
        ignored; ``overrides`` (DDIM arguments or ``backend``) replace values.
        """
        unknown = set(overrides) - set(CONFIG_NAMES) - {"backend"}
        if unknown:
            raise TypeError(f"DDIMScheduler.from_config got unknown arguments {sorted(unknown)}")
        known = {name: value for name, value in dict(config).items() if name in CONFIG_NAMES}
        return cls(**{**known, **overrides})

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self.config)})"

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        """The ``num_inference_steps`` descending timesteps, as diffusers (see the class notes)."""
        config = self.config
        self.timesteps = reference.ddim_timesteps(
            operator.index(num_inference_steps), config.num_train_timesteps,
            config.timestep_spacing, config.steps_offset, device=device)
        self.num_inference_steps = operator.index(num_inference_steps)
        self._device_table(self.timesteps.device)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, eta: float = 0.0,
             use_clipped_model_output: bool = False, generator: torch.Generator | None = None,
             variance_noise: torch.Tensor | None = None, return_dict: bool = True):
        """One DDIM step ``x_t -> x_{t - T // n}``: diffusers' ``step``, fused in one kernel."""
        if self.num_inference_steps is None:
            raise ValueError("Number of inference steps is 'None', you need to run "
                             "'set_timesteps' after creating the scheduler")
        if eta > 0 and variance_noise is not None and generator is not None:
            raise ValueError("Cannot pass both generator and variance_noise. Please make sure "
                             "that either `generator` or `variance_noise` stays `None`.")
        config = self.config
        prev_sample, pred_original_sample = ops.ddim_step(
            model_output, _integer_timestep(timestep), sample, self._device_table(sample.device),
            num_inference_steps=self.num_inference_steps,
            final_alpha_cumprod=float(self.final_alpha_cumprod), eta=eta,
            prediction_type=config.prediction_type, clip_sample=config.clip_sample,
            clip_sample_range=config.clip_sample_range, thresholding=config.thresholding,
            dynamic_thresholding_ratio=config.dynamic_thresholding_ratio,
            sample_max_value=config.sample_max_value,
            use_clipped_model_output=use_clipped_model_output,
            variance_noise=variance_noise, generator=generator, backend=self.backend)
        if not return_dict:
            return prev_sample, pred_original_sample
        return DDIMSchedulerOutput(prev_sample, pred_original_sample)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps) -> torch.Tensor:
        """``sqrt(a_t) * x0 + sqrt(1 - a_t) * noise``, one ``t`` per sample."""
        return reference.add_noise(original_samples, noise, _flat_timesteps(timesteps),
                                   self._device_table(original_samples.device))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """``v = sqrt(a_t) * noise - sqrt(1 - a_t) * sample``, one ``t`` per sample."""
        # add_noise(noise, -sample) is exactly this expression (negation is exact).
        velocity = reference.add_noise(noise, -sample, _flat_timesteps(timesteps),
                                       self._device_table(sample.device))
        return velocity.to(sample.dtype)

    def _device_table(self, device) -> torch.Tensor:
        """The float32 ``alphas_cumprod`` on ``device``, uploaded once per device.

        Rebuilt when ``alphas_cumprod`` is replaced or modified in place.
        """
        source = self.alphas_cumprod
        if self._table_source is not source or self._table_version != source._version:
            self._tables, self._table_source, self._table_version = {}, source, source._version
        device = _canonical(torch.device(device))
        table = self._tables.get(device)
        if table is None:
            table = source.to(device=device, dtype=torch.float32).contiguous()
            self._tables[device] = table
        return table


CONFIG_NAMES = tuple(
    name for name, p in inspect.signature(DDIMScheduler.__init__).parameters.items()
    if p.kind is p.POSITIONAL_OR_KEYWORD and name != "self")


def _canonical(device: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, the form a tensor's ``.device`` has."""
    if device.type == "cpu" or device.index is not None:
        return device
    return torch.empty(0, device=device).device


def _integer_timestep(timestep):
    """An int or an integer tensor; integral floats (some pipelines pass them) converted.

    A float tensor off the CPU is rounded without a check (checking would sync).
    Anything else goes through as is, for ``ops.ddim_step`` to reject.
    """
    if isinstance(timestep, torch.Tensor):
        if not timestep.dtype.is_floating_point:
            return timestep
        if timestep.device.type == "cpu" and not bool((timestep == timestep.round()).all()):
            raise ValueError(f"timestep must be integral, got {timestep.tolist()}")
        return timestep.round().long()
    if isinstance(timestep, bool):
        return timestep
    if isinstance(timestep, numbers.Integral):
        return int(timestep)
    if isinstance(timestep, numbers.Real):
        if not float(timestep).is_integer():
            raise ValueError(f"timestep must be integral, got {timestep!r}")
        return int(timestep)
    return timestep


def _flat_timesteps(timesteps):
    """Per-sample timesteps as ``(B,)`` (diffusers flattens them), 0-d and ints kept."""
    timesteps = _integer_timestep(timesteps)
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() > 1:
        return timesteps.flatten()
    return timesteps
