"""Stand-ins ("not run") for the files gpu_check.sh promises but a step did not write.

The script's output folder always holds the same five files, so whoever
fetches it can tell "not run" from "lost". Each stand-in says why, taken
from the step that should have written it.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from xml.sax.saxutils import quoteattr

from vqkernels.bench.evidence import Step

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def reason(steps: dict[str, Step], step: str, what: str) -> str:
    """Why ``what`` is missing, from the status and note of ``step``."""
    found = steps.get(step)
    if found is None:
        return f"{what}: the {step} step was not recorded"
    if found.status == "not run":
        return f"{what}: {step} not run ({found.note or 'no reason recorded'})"
    if found.status == "ok":
        return f"{what}: {step} exited 0 but did not write it ({found.note or 'see its log'})"
    return f"{what}: {step} {found.status} (exit {found.code}); see its log in logs.tar.gz"


def fill(steps: dict[str, Step], *, bench: str | None, plot: str | None,
         junit: str | None) -> list[str]:
    """Write a stand-in for each of ``bench``, ``plot`` and ``junit`` that does not exist."""
    written = []
    if bench and not Path(bench).exists():
        write_bench(bench, reason(steps, "bench", "no benchmark results"))
        written.append(bench)
    if plot and not Path(plot).exists():
        why = reason(steps, "bench", "no plot")
        if bench and bench not in written:  # the bench ran but could not plot
            why = ("no plot: the bench wrote its JSON but no PNG (bench.log says why; "
                   "matplotlib may be missing). Plot it elsewhere: "
                   "python -m vqkernels.bench.report bench.json bench.png")
        write_png(plot, why)
        written.append(plot)
    if junit and not Path(junit).exists():
        write_junit(junit, reason(steps, "pytest-cuda", "no pytest -m cuda results"))
        written.append(junit)
    return written


def write_bench(path: str, why: str) -> None:
    """A bench.json with no rows and the reason under ``not_run``."""
    Path(path).write_text(json.dumps({"not_run": why, "rows": []}, indent=2) + "\n")


def write_junit(path: str, why: str) -> None:
    """A junit XML with an empty test suite and the reason as its ``not_run`` property."""
    Path(path).write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites><testsuite name="pytest -m cuda" '
        'tests="0" errors="0" failures="0" skipped="0"><properties><property name="not_run" '
        f'value={quoteattr(why)} /></properties></testsuite></testsuites>\n')


def write_png(path: str, why: str) -> None:
    """A PNG that says ``why`` (with matplotlib), else a small blank PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        Path(path).write_bytes(blank_png())
        return
    fig = plt.figure(figsize=(6, 1))
    fig.text(0.5, 0.5, why, ha="center", va="center", fontsize=9, wrap=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def blank_png(width: int = 16, height: int = 16) -> bytes:
    """A white RGB PNG, written by hand: the machine may have no imaging library."""
    rows = b"".join(b"\x00" + b"\xff" * (3 * width) for _ in range(height))  # filter 0 per row
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (_PNG_MAGIC + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
            + _chunk(b"IEND", b""))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
