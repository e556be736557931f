"""``run_demo``: tokenizer, DiT, sampling and the judge, timed stage by stage.

Each stage prints one line when done: its wall time and, beside it, the
per-step time of vqkernels' modules and of their pure-PyTorch twins
(``twins.py``). ``run_demo`` writes ``metrics.json``, ``reconstructions.png``
and ``samples.png`` into ``out_dir`` and returns the metrics.
"""
from __future__ import annotations

import datetime
import platform
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch

import vqkernels
from vqkernels._dispatch import requested_backend
from vqkernels.demo import diffusion, report, twins
from vqkernels.demo.config import FULL, QUICK, DemoConfig
from vqkernels.demo.data import flat_pixels, load_digits, require_sklearn
from vqkernels.demo.progress import timed
from vqkernels.demo.tokenizer import DigitTokenizer, evaluate_tokenizer, train_tokenizer


def run_demo(out_dir, *, device=None, quick: bool = False, seed: int = 0,
             backend: str | None = None, threads: int | None = None, progress: bool = True,
             config: DemoConfig | None = None, echo=print) -> dict:
    """The whole demo into ``out_dir``; the metrics dict (``passed``: every check held).

    ``config`` defaults to ``QUICK`` with ``quick``, else ``FULL``; ``backend``
    goes to every vqkernels op (None: ``$VQKERNELS_BACKEND``, else auto);
    ``threads`` sets torch's CPU threads for the run; ``echo`` prints the
    stage lines. Reproducible per seed on one machine.
    """
    require_sklearn()
    config = config or (QUICK if quick else FULL)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with _seeded(seed, threads):
        demo = _Demo(config, device, backend, progress, echo, seed)
        tokenizer = demo.tokenizer_stage()
        model, scaler = demo.dit_stage(tokenizer)
        images, labels = demo.sampling_stage(model, tokenizer, scaler)
        demo.judge_stage(images, labels)
        run = _run_info(quick, seed, device, backend, config)
    files = demo.save_grids(out, images, labels)
    demo.timings["total_s"] = time.perf_counter() - start
    checks = _checks(demo.metrics, config)
    results = {"passed": all(c["passed"] for c in checks), **demo.metrics, "checks": checks,
               "timings": {**demo.timings, "twins": demo.twin_times}, "files": files,
               "run": run}
    report.write_json(out / "metrics.json", results)
    return results


@contextmanager
def _seeded(seed: int, threads: int | None):
    """Seeds torch (every device), asks for deterministic algorithms and sets the CPU
    threads; restores the mode and the thread count."""
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_threads = torch.get_num_threads()
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if threads:
        torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*deterministic.*")
            yield
    finally:
        torch.use_deterministic_algorithms(was_deterministic, warn_only=was_warn_only)
        torch.set_num_threads(was_threads)


class _Demo:
    """The stages of one run, sharing the data, the judge, the timings and the metrics."""

    def __init__(self, config: DemoConfig, device, backend, progress, echo, seed):
        from vqkernels.demo.judge import Judge

        self.config, self.device, self.backend = config, device, backend
        self.progress, self.echo = progress, echo
        self.timings, self.twin_times, self.metrics = {}, {}, {}
        with self.timed("data_s"):
            self.digits = load_digits().to(device)
            self.judge = Judge(self.pixels(self.digits.train_images),
                               self.digits.train_labels.cpu().numpy(), seed=seed)
        self.test_pixels = self.pixels(self.digits.test_images)
        self.echo(report.format_stage(
            "data", self.timings["data_s"], f"{len(self.digits.train_labels)} train / "
            f"{len(self.digits.test_labels)} held out", None))

    pixels = staticmethod(flat_pixels)

    def timed(self, key: str):
        return timed(self.timings, key, self.device)

    def twin(self, stage: str, measure, *args) -> dict:
        """Times ``stage``'s steps on vqkernels and on the twins (outside the stage's time)."""
        with self.timed("twins_s"):
            self.twin_times[stage] = measure(*args, self.config, self.backend)
        return self.twin_times[stage]

    def tokenizer_stage(self) -> DigitTokenizer:
        config, digits = self.config, self.digits
        with self.timed("tokenizer_s"):
            tokenizer = DigitTokenizer(config, backend=self.backend).to(self.device)
            self.metrics["tokenizer_loss"] = train_tokenizer(
                tokenizer, digits.train_images, config, progress=self.progress)
            held_out = evaluate_tokenizer(tokenizer, digits.test_images)
            train = evaluate_tokenizer(tokenizer, digits.train_images)
        twin = self.twin("tokenizer", twins.time_tokenizer, tokenizer, digits.train_images)
        self.reconstructions = held_out["reconstructions"]
        self.metrics.update(
            reconstruction_mse=held_out["mse"],
            reconstruction_accuracy=self.judge.accuracy(self.pixels(self.reconstructions),
                                                        digits.test_labels.cpu().numpy()),
            codebook_size=config.codebook_size, codebook_perplexity=train["perplexity"],
            dead_codes=train["dead_codes"], held_out_codebook_perplexity=held_out["perplexity"],
            held_out_dead_codes=held_out["dead_codes"],
            frechet_distance_reconstruction=self.judge.frechet(
                self.pixels(train["reconstructions"]), self.test_pixels))
        self.echo(report.format_stage("tokenizer", self.timings["tokenizer_s"],
                                      f"{config.tokenizer_steps} steps", twin))
        self.echo(f"{'':11}held-out MSE {held_out['mse']:.4f}, codebook perplexity "
                  f"{train['perplexity']:.1f} of {config.codebook_size}, "
                  f"{train['dead_codes']} dead codes")
        return tokenizer

    def dit_stage(self, tokenizer: DigitTokenizer):
        """The DiT on the normalized quantized latents of the training digits."""
        config, labels = self.config, self.digits.train_labels
        with self.timed("dit_s"):
            with torch.no_grad():
                latents = tokenizer.encode(self.digits.train_images)[0]
            scaler = diffusion.LatentScaler.fit(latents)
            latents = scaler.normalize(latents)
            model = diffusion.build_dit(config, backend=self.backend).to(self.device)
            self.metrics["dit_loss"] = diffusion.train_dit(model, latents, labels, config,
                                                           progress=self.progress)
        twin = self.twin("dit", twins.time_dit, model, latents, labels)
        self.metrics["dit_parameters"] = sum(p.numel() for p in model.parameters())
        self.echo(report.format_stage("DiT", self.timings["dit_s"], f"{config.dit_steps} steps",
                                      twin))
        return model, scaler

    def sampling_stage(self, model, tokenizer, scaler):
        config = self.config
        labels = diffusion.sample_labels(config, self.device)
        with self.timed("sampling_s"):
            images = diffusion.sample_images(model, tokenizer, scaler, labels, config,
                                             backend=self.backend, progress=self.progress)
        twin = self.twin("sampling", twins.time_sampling, model, labels)
        self.echo(report.format_stage("sampling", self.timings["sampling_s"],
                                      f"{len(labels)} x {config.ddim_steps} DDIM", twin))
        return images, labels

    def judge_stage(self, images, labels) -> None:
        with self.timed("judge_s"):
            judge, sample_pixels = self.judge, self.pixels(images)
            sample_labels = labels.cpu().numpy()
            self.metrics.update(
                classifier_accuracy=judge.accuracy(self.test_pixels,
                                                   self.digits.test_labels.cpu().numpy()),
                sample_accuracy=judge.accuracy(sample_pixels, sample_labels),
                per_class_sample_accuracy=judge.per_class_accuracy(sample_pixels, sample_labels),
                num_samples=len(sample_labels),
                frechet_distance=judge.frechet(sample_pixels, self.test_pixels),
                frechet_distance_real=judge.frechet(self.pixels(self.digits.train_images),
                                                    self.test_pixels))
        self.metrics["frechet_ratio"] = (self.metrics["frechet_distance"]
                                         / self.metrics["frechet_distance_real"])

    def save_grids(self, out: Path, images, labels) -> list[str]:
        files = ["metrics.json"]
        if report.save_reconstructions(out / "reconstructions.png", self.digits.test_images,
                                       self.reconstructions):
            files.append("reconstructions.png")
        if report.save_samples(out / "samples.png", images, labels):
            files.append("samples.png")
        return files


def _checks(metrics: dict, config: DemoConfig) -> list[dict]:
    rows = (("sample_accuracy", ">=", config.min_sample_accuracy),
            ("reconstruction_accuracy", ">=", config.min_reconstruction_accuracy),
            ("frechet_ratio", "<=", config.max_frechet_ratio))
    return [{"name": name, "value": metrics[name], "relation": relation, "bound": bound,
             "passed": metrics[name] >= bound if relation == ">=" else metrics[name] <= bound}
            for name, relation, bound in rows]


def _run_info(quick, seed, device, backend, config) -> dict:
    from sklearn import __version__ as sklearn_version

    return {"quick": quick, "seed": seed, "device": str(device),
            "backend": requested_backend(backend), "threads": torch.get_num_threads(),
            "host": platform.node(), "processor": platform.processor() or platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {"vqkernels": vqkernels.__version__, "torch": torch.__version__,
                         "scikit-learn": sklearn_version},
            "config": config.as_dict()}
