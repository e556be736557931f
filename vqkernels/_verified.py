"""Which GPU backends have passed their parity checks on real hardware, and where that is recorded.

``VERIFIED`` is the package's only record of this. On a CUDA device
``backend="auto"`` prefers the backends verified for the device's compute
capability (``vqkernels._dispatch``), and ``info()`` and ``selftest`` print
each op's GPU status from it. So that no backend counts as verified without
evidence, an entry is made only from a selftest results file committed under
``benchmarks/results/`` (``entries_from_selftest`` says how), and
``tests/test_dispatch.py`` holds every entry to its file (``entry_problems``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GPU_BACKENDS = ("cuda", "triton")
NOT_RUN = "not yet run on a GPU"


@dataclass(frozen=True)
class Verification:
    """An (op, backend, compute capability) that passed selftest on a GPU, and its results file.

    - ``op``: the dispatch it speaks for (``OpDispatch.op``). "nearest_code" covers
      ``nearest_code``, ``vector_quantize`` and ``nearest_code_with_stats``, which
      share that dispatch, so all three must have passed.
    - ``backend``: "cuda" or "triton" (Triton compiled for and run on the GPU).
    - ``capability``: the compute capability it ran on, e.g. ``(9, 0)``.
    - ``device``: ``torch.cuda.get_device_name()``, e.g. "NVIDIA H100 80GB HBM3".
    - ``date``: the run's date, YYYY-MM-DD.
    - ``results``: the results file, relative to the repository root.
    """

    op: str
    backend: str
    capability: tuple[int, int]
    device: str
    date: str
    results: str


_H200 = "benchmarks/results/2026-12-04-h200-selftest.json"
# From that run's selftest, less attention on cuda: its rows passed, but its backward is
# Triton's, which failed `pytest -m cuda` that day and has changed since (one padded
# head tile); ddim_step and the adaLN ops did not run (an earlier attention fault had
# broken the CUDA context).
VERIFIED: tuple[Verification, ...] = (
    Verification("code_counts_and_sums", "cuda", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("code_counts_and_sums", "triton", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("ema_update_", "cuda", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("ema_update_", "triton", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("nearest_code", "cuda", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("nearest_code", "triton", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("timestep_embedding", "cuda", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
    Verification("timestep_embedding", "triton", (9, 0), "NVIDIA H200", "2026-12-04", _H200),
)


def verifications(op: str, backend: str) -> list[Verification]:
    """The entries for ``backend`` of the dispatch ``op``, on any GPU."""
    return [v for v in VERIFIED if v.op == op and v.backend == backend]


def is_verified(op: str, backend: str, capability: tuple[int, int]) -> bool:
    """Has ``backend`` of ``op`` passed on a GPU of this compute capability?"""
    return any(tuple(v.capability) == tuple(capability) for v in verifications(op, backend))


def gpu_status(op: str, backend: str) -> str:
    """"verified on <device> (sm_XY), <date>" for each entry, or "not yet run on a GPU"."""
    entries = verifications(op, backend)
    if not entries:
        return NOT_RUN
    return "; ".join(f"verified on {v.device} (sm_{v.capability[0]}{v.capability[1]}), {v.date}"
                     for v in entries)


def entries_from_selftest(path: str | Path) -> list[Verification]:
    """An entry for every (op, backend) of a CUDA selftest JSON whose rows all passed.

    How a results file becomes entries (from the repository root):

    1. on the GPU: ``python -m vqkernels selftest --device cuda --json
       benchmarks/results/<YYYY-MM-DD>-<gpu>-selftest.json``, and commit the file;
    2. ``python -c "from vqkernels._verified import entries_from_selftest as e;
       print(*e('benchmarks/results/<file>.json'), sep=',\\n')"`` prints them;
    3. paste them into ``VERIFIED``; ``tests/test_dispatch.py`` checks each one
       against its file (``entry_problems``).
    """
    document = _load(path)
    if document.get("device_type") != "cuda":
        raise ValueError(f"{path}: not a selftest run on a CUDA device "
                         f"(device_type {document.get('device_type')!r})")
    if not document.get("complete"):
        raise ValueError(f"{path}: selftest ran a subset of the ops (--ops); run them all")
    entries = []
    for (op, backend), rows in sorted(_rows_by_dispatch(document).items()):
        if backend in GPU_BACKENDS and all(row["passed"] for row in rows):
            entries.append(Verification(op, backend, tuple(document["capability"]),
                                        document["device"], document["date"][:10],
                                        Path(path).as_posix()))
    return entries


def entry_problems(entry: Verification, root: str | Path) -> list[str]:
    """Why ``entry`` is not backed by its results file under ``root`` ([] when it is)."""
    if not entry.results.startswith("benchmarks/results/"):
        return [f"{entry.results}: results must be committed under benchmarks/results/"]
    path = Path(root) / entry.results
    if not path.is_file():
        return [f"{entry.results}: no such file"]
    document = _load(path)
    problems = [f"{entry.results}: {key} is {document.get(key)!r}, the entry needs {want!r}"
                for key, want in (("device_type", "cuda"), ("device", entry.device),
                                  ("capability", list(entry.capability)), ("complete", True))
                if document.get(key) != want]
    if not str(document.get("date", "")).startswith(entry.date):
        problems.append(f"{entry.results}: date {document.get('date')!r} is not {entry.date}")
    rows = _rows_by_dispatch(document).get((entry.op, entry.backend), [])
    if not rows:
        problems.append(f"{entry.results}: no rows for {entry.op} on {entry.backend}")
    failed = [f"{r['op']} {r['dtype']} {r['what']}" for r in rows if not r["passed"]]
    if failed:
        problems.append(f"{entry.results}: {entry.op} on {entry.backend} failed: {failed}")
    return problems


def _load(path: str | Path) -> dict:
    with open(path) as source:
        return json.load(source)


def _rows_by_dispatch(document: dict) -> dict[tuple[str, str], list[dict]]:
    grouped: dict[tuple[str, str], list[dict]] = {}
    for row in document.get("rows", []):
        grouped.setdefault((row["dispatch"], row["backend"]), []).append(row)
    return grouped
