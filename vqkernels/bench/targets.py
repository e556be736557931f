"""The speed targets set by the ops' issues, and what a bench run says about them.

Each ``Target`` names bench rows (op family + a regular expression the row's
``shape`` must match in full) and either a speed-up over the fastest of its
baseline backends or a share of the device ceiling. A target holds for rows
of its ``device``: most for one run on an H100/H200 (``GPU_ONLY``), a few for
a run on a CPU; rows from another device are not judged by it.

``auto_decisions`` reads the same rows for the order ``auto`` should try the
kernel backends in: per op family (and mode, e.g. ``fwd`` / ``fwdbwd``) and
device, which kernel was fastest at each shape.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

OURS = ("cuda", "triton", "cpu", "vqkernels")  # rows that are vqkernels itself
KERNELS = ("cuda", "triton", "cpu")  # the backends ``auto`` orders
SDPA = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math", "sdpa-default")
GPU_ONLY = "cuda"


@dataclass(frozen=True)
class Target:
    """A bar some rows must clear: ``ratio`` x the fastest baseline, or ``ceiling_pct`` %."""

    family: str
    what: str
    shape: str  # regular expression, matched in full against a bench row's shape
    baselines: tuple[str, ...] = ("reference",)
    ratio: float | None = None
    ceiling_pct: float | None = None
    device: str = GPU_ONLY  # the device type of the rows it judges

    def matches(self, row: dict) -> bool:
        return row["op"] == self.family and re.fullmatch(self.shape, row["shape"]) is not None

    @property
    def needed(self) -> str:
        if self.ratio is not None:
            return f">= {self.ratio:g}x {_baseline_name(self.baselines)}"
        return f">= {self.ceiling_pct:g}% of the ceiling"


def _baseline_name(baselines: tuple[str, ...]) -> str:
    return "best SDPA" if baselines == SDPA else " / ".join(baselines)


_D72_FWD, _D72_FWDBWD = r"fwd-\d+x\d+x\d+x72-bfloat16", r"fwdbwd-\d+x\d+x\d+x72-bfloat16"
_ADALN_GPU = r"-\d+x\d+x1152-bfloat16"  # the (B, T, D) of vqkernels.bench.adaln's GPU shapes
_ADALN_CPU = r"-64x256x1152-float32"
_ADALN_OPS = r"(lnmod|residual|fused)"
_DIT_SAMPLE = r"dit-xl2-ddim50-cfg4-64x4x32x32-bfloat16"  # vqkernels.bench.models' GPU cases
_TOKENIZERS = r"(vqgan-f16-16384|llamagen-vq16)"
# The eager baselines of a whole model, the faster of which a target holds against: the twin and
# what a user runs (DiT on SDPA; a tokenizer on its repository's matmul-expansion search).
_EAGER_DIT, _EAGER_TOKENIZER = ("reference", "sdpa-eager"), ("reference", "original")
TARGETS = (
    Target("search", "bf16 K=16384 D=256 vs torch bf16 matmul + argmin",
           r"N\d+xK16384xD256-bf16", ratio=6),
    Target("search", "tf32 K=16384 D=256 vs torch matmul + argmin", r"N\d+xK16384xD256-tf32",
           ratio=4),
    Target("search", "ieee K=16384 D=256 vs torch matmul + argmin", r"N\d+xK16384xD256-ieee",
           ratio=3),
    Target("search", "D=8 vs torch matmul + argmin", r"N\d+xK\d+xD8-(bf16|tf32|ieee)", ratio=15),
    Target("search", "K=1024 vs torch matmul + argmin", r"N\d+xK1024xD\d+-(bf16|tf32|ieee)",
           ratio=5),
    Target("search", "ieee K=1024 D=256 vs faiss IndexFlatL2 (CPU)", r"N\d+xK1024xD256-ieee",
           ("faiss-flat",), ratio=1.1, device="cpu"),
    Target("search", "ieee D=8 vs faiss IndexFlatL2 (CPU)", r"N\d+xK\d+xD8-ieee", ("faiss-flat",),
           ratio=1.0, device="cpu"),
    Target("quantizer", "module train step at K=16384 vs its twin",
           r"(taming|vqp)-train-N\d+xK16384xD\d+", ratio=10),
    Target("quantizer", "EMA module (VectorQuantize) train step K=16384 D=256 vs its twin",
           r"vqp-train-N\d+xK16384xD256", ratio=15),
    Target("rvq", "ResidualVQ train step vs vector-quantize-pytorch", r"train-Q\d+xN\d+xK\d+xD\d+",
           ratio=10),
    Target("rvq", "ResidualVQ train step vs vector-quantize-pytorch (CPU)",
           r"train-Q8xN16384xK1024xD128", ratio=5, device="cpu"),
    Target("rvq", "fused residual search vs Q nearest_code calls", r"search-Q\d+xN\d+xK\d+xD\d+",
           ("nearest-code-loop",), ratio=2),
    Target("rvq", "fused residual search vs Q nearest_code calls (CPU)",
           r"search-Q8xN16384xK1024xD128", ("nearest-code-loop",), ratio=1.3, device="cpu"),
    Target("ema", "EMA update vs bincount + index_add_", r"N\d+xK\d+xD\d+-\w+", ratio=3),
    Target("ema", "EMA update vs one-hot matmul", r"N\d+xK\d+xD\d+-\w+", ("one-hot",), ratio=100),
    Target("ddim", "fused step + CFG vs plain PyTorch", r"step-\d+x4x\d+x\d+-\w+-cfg", ratio=5),
    Target("ddim", "fused step + CFG at (256,4,64,64): share of copy bandwidth",
           r"step-256x4x64x64-\w+-cfg", ceiling_pct=70),
    Target("attention", "d=72 bf16 forward vs the best SDPA backend", _D72_FWD, SDPA, ratio=1.0),
    Target("attention", "d=72 bf16 forward vs SDPA flash", _D72_FWD, ("sdpa-flash",), ratio=1.3),
    Target("attention", "d=72 bf16 forward + backward vs the best SDPA backend", _D72_FWDBWD,
           SDPA, ratio=1.0),
    Target("attention", "d=72 bf16 forward + backward vs SDPA flash", _D72_FWDBWD,
           ("sdpa-flash",), ratio=1.3),
    Target("adaln", "layer_norm_modulate forward: share of copy bandwidth",
           "lnmod-fwd" + _ADALN_GPU, ceiling_pct=85),
    Target("adaln", "layer_norm_modulate forward vs eager", "lnmod-fwd" + _ADALN_GPU, ratio=2.5),
    Target("adaln", "layer_norm_modulate forward + backward vs eager",
           "lnmod-fwdbwd" + _ADALN_GPU, ratio=2),
    Target("adaln", "layer_norm_modulate forward + backward vs torch.compile of eager",
           "lnmod-fwdbwd" + _ADALN_GPU, ("compiled",), ratio=1.2),
    Target("adaln", "gated residual + layer_norm_modulate fused forward vs eager",
           "fused-fwd" + _ADALN_GPU, ratio=3),
    Target("adaln", "each adaLN op forward vs eager (CPU)", _ADALN_OPS + "-fwd" + _ADALN_CPU,
           ratio=2, device="cpu"),
    Target("adaln", "each adaLN op forward + backward vs eager (CPU)",
           _ADALN_OPS + "-fwdbwd" + _ADALN_CPU, ratio=1.5, device="cpu"),
    Target("adaln", "DiTBlock forward + backward vs its twin ReferenceDiTBlock (CPU)",
           r"block-fwdbwd-8x256x1152-float32", ratio=1.2, device="cpu"),
    Target("models", "DiT-XL/2 50-step DDIM + CFG sampling, images/s vs eager PyTorch",
           _DIT_SAMPLE, _EAGER_DIT, ratio=1.5),
    Target("models", "DiT-XL/2 50-step DDIM + CFG sampling vs torch.compile of the SDPA twin",
           _DIT_SAMPLE, ("compiled",), ratio=1.1),
    Target("models", "DiT-XL/2 training step (forward + backward) vs eager PyTorch",
           r"dit-xl2-fwdbwd-32x4x32x32-bfloat16", _EAGER_DIT, ratio=1.3),
    Target("models", "tokenizing 256 px images end to end vs eager PyTorch",
           _TOKENIZERS + r"-tokenize-32x3x256x256-float32", _EAGER_TOKENIZER, ratio=1.3),
    Target("models", "the tokenizer's quantize stage vs eager PyTorch",
           _TOKENIZERS + r"-quantize-32x\d+x16x16-float32", _EAGER_TOKENIZER, ratio=10),
    Target("models", "DiT-S/2 forward vs eager PyTorch (CPU)", r"dit-s2-fwd-4x4x32x32-float32",
           _EAGER_DIT, ratio=1.2, device="cpu"),
    Target("models", "LlamaGen VQ-16 tokenizing 128 px images vs eager PyTorch (CPU)",
           r"llamagen-vq16-tokenize-2x3x128x128-float32", _EAGER_TOKENIZER, ratio=1.2,
           device="cpu"),
)


def evaluate(rows: list[dict], targets: tuple[Target, ...] = TARGETS,
             device: str = GPU_ONLY) -> list[dict]:
    """One verdict per (target of ``device``, row of ``OURS`` there at a matching shape).

    Each has ``target``, ``row``, ``value`` (the speed-up, or the % of the
    ceiling; None without a baseline row or a ceiling) and ``met``. A target
    no row of ours matches gets one verdict with ``row`` None.
    """
    verdicts = []
    for target in (t for t in targets if t.device == device):
        matching = [row for row in rows if row.get("device") == device and target.matches(row)]
        ours = [row for row in matching if row["backend"] in OURS]
        for row in ours:
            value = _value(target, row, matching)
            verdicts.append({"target": target, "row": row, "value": value,
                             "met": None if value is None else value >= threshold(target)})
        if not ours:
            verdicts.append({"target": target, "row": None, "value": None, "met": None})
    return verdicts


def threshold(target: Target) -> float:
    """The number a verdict's value must reach: the ratio or the percentage."""
    return target.ratio if target.ratio is not None else target.ceiling_pct


def format_value(verdict: dict) -> str:
    """A verdict's value as the target states it: "2.5x" or "85.0%"."""
    value = verdict["value"]
    return f"{value:.1f}%" if verdict["target"].ceiling_pct is not None else f"{value:.3g}x"


def _value(target: Target, row: dict, matching: list[dict]) -> float | None:
    if target.ceiling_pct is not None:
        return row.get("ceiling_pct")
    baselines = [other["time_us"] for other in matching if other["shape"] == row["shape"]
                 and other["backend"] in target.baselines and other.get("time_us")]
    return min(baselines) / row["time_us"] if baselines and row.get("time_us") else None


def decision_group(row: dict) -> str:
    """The op family plus its mode (``fwd``, ``step``, ``with stats``): one dispatch each."""
    mode = re.match(r"([a-z][a-z0-9]*)-", row["shape"])
    group = row["op"] + (f" {mode.group(1)}" if mode else "")
    return group + (" with stats" if row["shape"].endswith("-with-stats") else "")


def auto_decisions(rows: list[dict]) -> list[str]:
    """What the rows say about ``auto``'s order of the kernel backends, one line per group."""
    groups: dict[tuple[str, str], dict[str, dict[str, float]]] = {}
    for row in rows:
        if row["backend"] in KERNELS and row.get("time_us"):
            shapes = groups.setdefault((decision_group(row), row.get("device", "?")), {})
            shapes.setdefault(row["shape"], {})[row["backend"]] = row["time_us"]
    lines = []
    for (group, device), shapes in groups.items():
        compared = {shape: times for shape, times in shapes.items() if len(times) > 1}
        if compared:
            lines.append(_decision(group, device, compared))
    return lines


def _decision(group: str, device: str, shapes: dict[str, dict[str, float]]) -> str:
    """One group's line: a single order when one backend wins everywhere, else the split."""
    ranks: dict[str, list[int]] = {}
    winners: dict[str, list[str]] = {}
    margins = []
    for shape, times in shapes.items():
        order = sorted(times, key=times.get)
        for rank, backend in enumerate(order):
            ranks.setdefault(backend, []).append(rank)
        winners.setdefault(order[0], []).append(shape)
        margins.append(times[order[1]] / times[order[0]])
    order = sorted(ranks, key=lambda b: (sum(ranks[b]) / len(ranks[b]), b))
    where = f"{group} on {device}"
    if len(winners) == 1:
        winner = order[0]
        others = ", ".join(order[1:])
        spread = (f"{min(margins):.2g}x" if f"{min(margins):.2g}" == f"{max(margins):.2g}"
                  else f"{min(margins):.2g}-{max(margins):.2g}x")
        return (f"{where}: {winner} faster than {others} at every shape ({len(shapes)}; by "
                f"{spread}) -> auto order {', '.join(order)}")
    split = "; ".join(f"{backend} faster at {', '.join(found)}"
                      for backend, found in winners.items())
    return (f"{where}: depends on shape ({split}) -> auto needs a shape rule; "
            f"by mean rank: {', '.join(order)}")
