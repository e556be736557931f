"""Benchmark output: the table on screen, the JSON record and the speed-up plot.

JSON keys: ``device`` (name), ``versions`` (python, torch, triton, vqkernels),
``extension`` (``vqkernels._ext.build_info()``), ``date`` (ISO 8601, UTC),
``host``, ``ceilings`` (bandwidth B/s, FLOP/s per dtype, their source),
``quick``, ``triton_interpret`` and ``rows``: one per (op, shape, backend) with
``time_us``, ``speedup`` (reference time / this time), ``bytes``, ``flops``,
``bound``, ``achieved`` + ``achieved_unit``, ``floor_us``, ``ceiling_pct``,
``x_from_floor`` and ``peak_mib`` (null when it could not be measured).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket

import torch

from vqkernels import _ext
from vqkernels._version import __version__

_COLUMNS = ("op", "shape", "backend", "time us", "vs ref", "achieved", "% ceil", "x floor",
            "peak MiB")


def metadata(ceilings: dict, quick: bool) -> dict:
    """Where and with what the rows were measured."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": ceilings["device"],
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton_version, "vqkernels": __version__},
        "extension": _ext.build_info() or {"loaded": False, "error": _ext.LOAD_ERROR},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "ceilings": ceilings,
        "quick": quick,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _cells(row: dict) -> tuple[str, ...]:
    return (row["op"], row["shape"], row["backend"], _fmt(row["time_us"], ".1f"),
            _fmt(row["speedup"], ".3g") + ("x" if row["speedup"] is not None else ""),
            f"{row['achieved']:.3g} {row['achieved_unit']}", _fmt(row["ceiling_pct"], ".1f"),
            _fmt(row["x_from_floor"], ".1f"), _fmt(row["peak_mib"], ".2f"))


def format_table(rows: list[dict], meta: dict) -> str:
    """Aligned text table plus the ceilings it is judged against."""
    cells = [_COLUMNS] + [_cells(row) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.rjust(w) if i > 2 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ceil = meta["ceilings"]
    copy = f"copy {ceil['bandwidth'] / 1e9:.1f} GB/s" if ceil.get("bandwidth") else "copy unknown"
    flops = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceil["flops"].items() if v)
    lines += ["", f"device: {meta['device']}",
              f"ceilings ({ceil['source']}): {copy}; {flops or 'FLOP/s unknown'}",
              "floor = bytes / bandwidth (or flops / peak when larger); "
              "% ceil = floor / time; x floor = time / floor"]
    return "\n".join(lines)


def write_json(path: str, rows: list[dict], meta: dict) -> None:
    with open(path, "w") as out:
        json.dump({**meta, "rows": rows}, out, indent=2)
        out.write("\n")


def write_plot(path: str, rows: list[dict], meta: dict) -> bool:
    """Bar chart of speed-up vs reference per case and backend; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    labels = list(dict.fromkeys(f"{r['op']}\n{r['shape']}" for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    width = 0.8 / max(len(backends), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(labels)), 4), layout="constrained")
    for i, backend in enumerate(backends):
        speedups = {f"{r['op']}\n{r['shape']}": r["speedup"] for r in rows
                    if r["backend"] == backend}
        xs = [j + (i - (len(backends) - 1) / 2) * width for j in range(len(labels))]
        bars = ax.bar(xs, [speedups.get(label) or float("nan") for label in labels], width,
                      label=backend)
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
    ax.set_yscale("log")  # speed-ups span decades (interpreter rows, GPU kernels)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.margins(y=0.15)  # room for the bar labels
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("speed-up vs reference (x)")
    ax.set_title(f"vqkernels {meta['versions']['vqkernels']} on {meta['device']}", fontsize=9)
    ax.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
