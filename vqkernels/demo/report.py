"""What the demo leaves behind: PNG grids, the metrics JSON, and the printed summary."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

GRID_COLUMNS = 10


def _grid(images: torch.Tensor, rows: int) -> np.ndarray:
    """(rows * 10, 1, 8, 8) images -> one (rows * 9 - 1, 10 * 9 - 1) array, blank 1-pixel gaps."""
    images = images[: rows * GRID_COLUMNS].detach().float().cpu().clamp(0, 1)[:, 0].numpy()
    size = images.shape[-1]
    canvas = np.zeros((rows * (size + 1) - 1, GRID_COLUMNS * (size + 1) - 1))
    for i, image in enumerate(images):
        r, c = divmod(i, GRID_COLUMNS)
        canvas[r * (size + 1): r * (size + 1) + size, c * (size + 1): c * (size + 1) + size] = image
    return canvas


def _save(path: Path, canvas: np.ndarray, title: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    height, width = canvas.shape
    fig, ax = plt.subplots(figsize=(width / 14, height / 14 + 0.5))
    ax.imshow(1.0 - canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def save_reconstructions(path: Path, originals: torch.Tensor, reconstructions: torch.Tensor,
                         pairs: int = 4) -> bool:
    """Rows of 10 held-out originals, each followed by its row of reconstructions."""
    rows = []
    for k in range(pairs):
        chunk = slice(k * GRID_COLUMNS, (k + 1) * GRID_COLUMNS)
        rows += [originals[chunk], reconstructions[chunk]]
    return _save(path, _grid(torch.cat(rows), 2 * pairs),
                 "held-out digits (odd rows) and their VQ reconstructions (even rows)")


def save_samples(path: Path, images: torch.Tensor, labels: torch.Tensor) -> bool:
    """One row per class (0 to 9), the first 10 samples conditioned on it."""
    rows = [images[labels == k][:GRID_COLUMNS] for k in range(10)]
    return _save(path, _grid(torch.cat(rows), 10), "DiT samples, one row per class 0-9")


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")


def format_stage(name: str, seconds: float, detail: str, twin: dict | None) -> str:
    """``name  12.3 s  detail | per step: vqkernels X ms, pure-PyTorch twin Y ms (Zx)``."""
    line = f"{name:<10} {seconds:7.1f} s  {detail:<22}"
    if twin is not None:
        line += (f" | per step ({twin['steps']} timed): vqkernels {twin['vqkernels_ms']:.1f} ms, "
                 f"pure-PyTorch twin {twin['twin_ms']:.1f} ms ({twin['speedup']:.2f}x)")
    return line


def format_checks(results: dict) -> str:
    """One line per threshold: the value, the bound, pass or FAIL."""
    lines = []
    for check in results["checks"]:
        verdict = "pass" if check["passed"] else "FAIL"
        lines.append(f"{check['name']:<24} {check['value']:.4f} {check['relation']} "
                     f"{check['bound']:.4f}  {verdict}")
    return "\n".join(lines)
