"""Benchmark output: the table on screen, the JSON record and the speed-up plot.

Under the table: the ceilings, why a backend was skipped, and the issue
targets the rows meet or miss. The JSON record (``write_json`` lists its keys)
keeps the device, versions, build, date, ceilings and skipped backends next to
every row, so a saved run can be judged and compared later without the machine
it ran on. ``python -m vqkernels.bench.report BENCH_JSON PNG`` plots a saved
run again (e.g. one from a machine without matplotlib).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import socket
import sys

import torch

from vqkernels import _ext
from vqkernels._version import __version__
from vqkernels.bench import targets
from vqkernels.bench.cases import REFERENCE as REFERENCE_BACKEND
from vqkernels.bench.cases import Case

_COLUMNS = ("op", "shape", "backend", "time us", "rate", "vs ref", "also vs", "achieved",
            "limit", "% ceil", "x floor", "peak MiB")
_BAR_INCHES = 0.27  # height of one bar's slot in the plot: 8-point labels stay apart


def metadata(ceilings: dict, quick: bool, skipped: list[dict] | None = None) -> dict:
    """Where and with what the rows were measured; ``skipped``: see ``skipped_backends``."""
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
        "skipped": skipped or [],
    }


def skipped_backends(cases: list[Case]) -> list[dict]:
    """One ``{op, shape, backend, reason}`` per backend a case could not run here."""
    return [{"op": case.op, "shape": case.shape, "backend": backend, "reason": reason}
            for case in cases for backend, reason in case.skipped.items()]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(row: dict, key: str) -> str:
    """A percentage cell; "ceil!" where the time beat the floor (a ceiling measured too low)."""
    if row.get(key.replace("_pct", "_problem")):
        return "ceil!"
    return _fmt(row.get(key), ".1f")


def _limit(row: dict) -> str:
    """What the floor is set by: a FLOP/s dtype, a memory level, or a level that is in cache."""
    if row.get("bound") == "compute":
        return row.get("flop_dtype", "compute")
    level = row.get("memory_level", "memory")
    return f"{level} cache" if row.get("floor_us") is None else level


def _also_vs(row: dict) -> str:
    """The speed-ups over the case's other baselines: "1.3x compiled"."""
    return ", ".join(f"{x:.3g}x {name}" for name, x in row.get("speedups", {}).items()) or "-"


def _rate(row: dict) -> str:
    """Items made per second: "71.3 images/s"; "-" for a case without items."""
    if not row.get("items_per_s"):
        return "-"
    return f"{row['items_per_s']:.3g} {row['items_unit']}/s"


def _cells(row: dict, measured: bool, rate: bool, also: bool) -> tuple[str, ...]:
    cells = (row["op"], row["shape"], row["backend"], _fmt(row["time_us"], ".1f"))
    cells += (_rate(row),) if rate else ()
    cells += (_fmt(row["speedup"], ".3g") + ("x" if row["speedup"] is not None else ""),)
    cells += (_also_vs(row),) if also else ()
    cells += (f"{row['achieved']:.3g} {row['achieved_unit']}", _limit(row),
              _pct(row, "ceiling_pct"))
    if measured:
        cells += (_pct(row, "measured_ceiling_pct"),)
    return cells + (_fmt(row["x_from_floor"], ".1f"), _fmt(row["peak_mib"], ".2f"))


def format_table(rows: list[dict], meta: dict) -> str:
    """Aligned text table, the ceilings it is judged against, ceiling problems, skipped
    backends and the targets of the families in the rows.

    "rate" (items per second, e.g. images/s) and "also vs" (speed-ups over a case's other
    baselines) show only when a row has one.
    """
    measured = "measured" in meta["ceilings"]
    rate = any(row.get("items_per_s") for row in rows)
    also = any(row.get("speedups") for row in rows)
    columns = (_COLUMNS[:4] + _COLUMNS[4:5] * rate + _COLUMNS[5:6] + _COLUMNS[6:7] * also
               + _COLUMNS[7:10] + ("% meas",) * measured + _COLUMNS[10:])
    cells = [columns] + [_cells(row, measured, rate, also) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(cell.rjust(w) if i > 2 else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(line, widths))) for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += ["", f"device: {meta['device']}"] + describe_ceilings(meta["ceilings"])
    lines.append("floor = bytes / bandwidth of the memory level the working set fits in (or "
                 "flops / peak when larger); % ceil = floor / time; x floor = time / floor")
    lines += [f"ceil! {row['op']} {row['shape']} {row['backend']}: {problem}"
              for row in rows for problem in (row.get("ceiling_problem"),
                                              row.get("measured_ceiling_problem")) if problem]
    return "\n".join(lines + _skipped_lines(meta.get("skipped", ())) + target_lines(rows))


def _skipped_lines(skipped: list[dict]) -> list[str]:
    """One line per (family, backend, reason): the shapes it was skipped at, and why."""
    shapes: dict[tuple[str, str, str], list[str]] = {}
    for entry in skipped:
        shapes.setdefault((entry["op"], entry["backend"], entry["reason"]), []).append(
            entry["shape"])
    return [f"skipped: {op} {backend} at {', '.join(found)}: {reason}"
            for (op, backend, reason), found in shapes.items()]


def target_lines(rows: list[dict]) -> list[str]:
    """The targets of each device and op family in ``rows``: measured, needed, met or not."""
    lines = []
    for device in dict.fromkeys(row.get("device") for row in rows):
        families = {row["op"] for row in rows if row.get("device") == device}
        for verdict in targets.evaluate(rows, device=device):
            target = verdict["target"]
            if target.family in families:
                lines.append(f"target: {target.family} {target.what} ({target.needed}): "
                             + _verdict_text(verdict))
    return lines


def _verdict_text(verdict: dict) -> str:
    row = verdict["row"]
    if row is None:
        return "no row of ours at its shapes in this run"
    where = f"{row['shape']} {row['backend']}"
    if verdict["value"] is None:
        return f"{where}: no baseline row"
    return f"{where}: {targets.format_value(verdict)}, {'met' if verdict['met'] else 'MISSED'}"


def describe_ceilings(ceilings: dict) -> list[str]:
    """One line for the ceilings the table uses, one for those measured at start (GPU)."""
    lines = [f"ceilings ({ceilings['source']}): {_bandwidths(ceilings)}; {_flops(ceilings)}"]
    if ceilings.get("measured"):
        measured = ceilings["measured"]
        lines.append(f"measured at start (% meas): {ceilings.get('memory', 'memory')} "
                     f"{_gbs(measured.get('bandwidth'))}; {_flops(measured)}")
    return lines


def _gbs(bandwidth: float | None) -> str:
    return "copy unknown" if not bandwidth else f"copy {bandwidth / 1e9:.1f} GB/s"


def _bandwidths(ceilings: dict) -> str:
    parts = []
    for level in ceilings.get("levels", ()):
        size = f"{level['name']} ({level['bytes'] / 2**20:.3g} MiB)"
        parts.append(f"{size} {_gbs(level['bandwidth'])}" if level["bandwidth"]
                     else f"{size} in cache: no bandwidth floor")
    parts.append(f"{ceilings.get('memory', 'memory')} {_gbs(ceilings.get('bandwidth'))}")
    return ", ".join(parts)


def _flops(ceilings: dict) -> str:
    flops = ", ".join(f"{k} {v / 1e12:.3g} TFLOP/s" for k, v in ceilings.get("flops", {}).items()
                      if v)
    return flops or "FLOP/s unknown"


def write_json(path: str, rows: list[dict], meta: dict) -> None:
    """``meta`` (``metadata``) and ``rows`` as one JSON document at ``path``.

    Keys: ``device`` (name), ``versions`` (python, torch, triton, vqkernels),
    ``extension`` (``vqkernels._ext.build_info()``), ``date`` (ISO 8601, UTC),
    ``host``, ``ceilings`` (``vqkernels.bench.ceilings``: ``bandwidth`` B/s of
    ``memory``, ``levels`` of cache above it, ``flops`` per dtype, their
    ``source``, and on a GPU ``measured``: copy bandwidth and GEMM FLOP/s
    measured at start), ``quick``, ``triton_interpret`` and ``rows``: one per
    (op, shape, backend) with ``time_us``, ``speedup`` (reference time / this
    time), ``bytes``, ``working_set``, ``flops``, ``flop_dtype``, ``bound``,
    ``memory_level``, ``achieved`` + ``achieved_unit``, ``floor_us``,
    ``ceiling_pct``, ``x_from_floor``, ``ceiling_problem`` (why a time under
    its floor got no percentage), ``measured_ceiling_pct`` +
    ``measured_ceiling_problem`` (against the ceilings measured at start; null
    off GPUs in the table), ``peak_mib`` (null when it could not be measured),
    ``items_per_s`` + ``items_unit`` (e.g. images/s; null for a case without items) and
    ``speedups`` (over the case's other baselines, by backend); ``skipped``: the
    backends not timed, each with its op, shape and reason; ``failed`` (written by
    the CLI): the backends that raised, each with its op, shape and error.
    """
    with open(path, "w") as out:
        json.dump({**meta, "rows": rows}, out, indent=2)
        out.write("\n")


def write_plot(path: str, rows: list[dict], meta: dict) -> bool:
    """Horizontal bar chart of speed-ups; False without matplotlib.

    One bar per (case, backend) that has a speed-up, grouped by op family,
    drawn from 1x (the reference, left out) on a log axis and labelled with
    its value; one colour per backend.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    slots = _plot_slots(rows)
    bars = [row for row in slots if isinstance(row, dict)]
    backends = list(dict.fromkeys(row["backend"] for row in bars))
    colours = {b: plt.get_cmap("tab10" if len(backends) <= 10 else "tab20")(i)
               for i, b in enumerate(backends)}
    fig, ax = plt.subplots(figsize=(10, 1.4 + _BAR_INCHES * len(slots)), layout="constrained")
    for y, row in enumerate(slots):
        if isinstance(row, str):  # an op family's heading
            ax.text(0.0, y, row, transform=ax.get_yaxis_transform(), ha="right", va="center",
                    fontsize=9, fontweight="bold")
            continue
        speedup = row["speedup"]
        ax.barh(y, speedup - 1, left=1, height=0.7, color=colours[row["backend"]])
        ax.text(speedup, y, f" {speedup:.3g}x ", va="center", fontsize=7,
                ha="left" if speedup >= 1 else "right")
    _decorate(ax, slots, colours, meta)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_slots(rows: list[dict]) -> list:
    """Top to bottom: each op family's name, then its non-reference rows with a speed-up."""
    slots = []
    for op in dict.fromkeys(row["op"] for row in rows):
        bars = [row for row in rows if row["op"] == op and row["backend"] != REFERENCE_BACKEND
                and row["speedup"]]
        if bars:
            slots += [op] + bars
    return slots


def _decorate(ax, slots: list, colours: dict, meta: dict) -> None:
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    bars = [(y, row) for y, row in enumerate(slots) if isinstance(row, dict)]
    ax.set_yticks([y for y, _ in bars], [f"{row['shape']}  {row['backend']}" for _, row in bars],
                  fontsize=7)
    ax.set_ylim(len(slots) - 0.4, -0.6)  # first row on top
    ax.set_xscale("log")  # speed-ups span decades (interpreter rows, GPU kernels)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}x"))
    speedups = [row["speedup"] for _, row in bars] or [1.0]
    ax.set_xlim(min(0.5, min(speedups) / 3), max(2.0, max(speedups) * 3))  # room for labels
    ax.axvline(1.0, color="black", linewidth=0.9)
    ax.grid(axis="x", which="major", linewidth=0.3)
    ax.set_xlabel("speed-up vs the PyTorch reference (log scale; the line at 1x is the reference)")
    version = meta.get("versions", {}).get("vqkernels", "")
    title = f"vqkernels {version}".rstrip() + f" on {meta.get('device', 'an unknown device')}"
    title += f", {meta['date'][:10]}" if meta.get("date") else ""
    ax.set_title(title + (" (quick)" if meta.get("quick") else ""), fontsize=9)
    ax.legend(handles=[Patch(color=c, label=b) for b, c in colours.items()], fontsize=7,
              loc="upper left", bbox_to_anchor=(1.01, 1.0), title="backend", title_fontsize=7)


def main(argv: list[str] | None = None) -> int:
    """``python -m vqkernels.bench.report BENCH_JSON PNG``: plot a saved run again."""
    if len(argv if argv is not None else sys.argv[1:]) != 2:
        print("usage: python -m vqkernels.bench.report BENCH_JSON PNG", file=sys.stderr)
        return 2
    source, target = argv if argv is not None else sys.argv[1:]
    try:
        with open(source) as saved:
            meta = json.load(saved)
    except (OSError, ValueError) as error:
        print(f"cannot read {source} as bench JSON: {error}", file=sys.stderr)
        return 1
    if not isinstance(meta, dict) or not meta.get("rows"):
        print(f"{source} has no rows to plot", file=sys.stderr)
        return 1
    if not write_plot(target, meta.pop("rows"), meta):
        print("matplotlib is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
