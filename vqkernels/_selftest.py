"""``vqkernels.selftest()``, ``python -m vqkernels selftest``: does each backend here compute right?

For a user right after ``pip install``: every public op on every backend that
can run on the device (as its dispatch's ``explain`` says), forward and
gradients, in every dtype the backend takes (fp32 only for Triton under the
interpreter, which is slow and has no bfloat16), on small odd shapes, against
the float64 reference by the numerics contract of ``vqkernels.testing``
(the checks are in ``vqkernels._selftest_cases``). A backend that raises is a
failed row carrying the error. On a CPU, Triton runs only when
``TRITON_INTERPRET=1`` was set before triton was imported.
"""
from __future__ import annotations

import datetime
import json
import os
import time
import traceback

import torch

from vqkernels import _verified
from vqkernels._info import versions
from vqkernels._selftest_cases import CASES, Case

OPS = tuple(case.op for case in CASES)
INTERPRETER_DTYPES = (torch.float32,)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COLUMNS = ("op", "backend", "dtype", "what", "max error", "allowed", "pass")


def selftest(device: str | torch.device | None = None, *, ops: list[str] | None = None,
             json_path: str | None = None, print_table: bool = True, seed: int = 0) -> list[dict]:
    """Check every op x backend x dtype usable on ``device``; print the table; return the rows.

    ``device``: "cpu" or "cuda" (default: cuda if available). ``ops``: a subset
    of ``OPS`` (default all). ``json_path``: also write the rows with the
    device, versions and date there. Each row has ``op``, ``dispatch`` (the op
    whose dispatch picked the backend), ``backend``, ``dtype``, ``what``,
    ``error``, ``allowed``, ``passed`` and ``message`` (the exception, if one
    was raised). Failures do not raise: check ``all(row["passed"] ...)``.
    """
    device = _device(device)
    cases = _cases(ops)
    start = time.perf_counter()
    rows, unavailable = [], []
    for case in cases:
        case_rows, case_unavailable = _run_case(case, device, seed)
        rows += case_rows
        unavailable += case_unavailable
    document = _document(device, cases, rows, unavailable, seed, time.perf_counter() - start)
    if print_table:
        print(format_report(document))
    if json_path:
        with open(json_path, "w") as out:
            json.dump(document, out, indent=2)
            out.write("\n")
    return rows


def _device(device) -> torch.device:
    device = torch.device(device if device is not None else
                          "cuda" if torch.cuda.is_available() else "cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda': no CUDA GPU is available here "
                         "(torch.cuda.is_available() is False)")
    return device


def _cases(ops) -> tuple[Case, ...]:
    if ops is None:
        return CASES
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise ValueError(f"ops must be among {list(OPS)}, got unknown {unknown}")
    return tuple(case for case in CASES if case.op in ops)


def _dtypes(case: Case, backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    if device.type == "cuda":
        return tuple(d for d in case.dtypes if d in CUDA_DTYPES)
    if backend == "triton":
        return tuple(d for d in case.dtypes if d in INTERPRETER_DTYPES)
    return case.dtypes


def _run_case(case: Case, device: torch.device, seed: int) -> tuple[list[dict], list[dict]]:
    """The rows of every backend x dtype of ``case`` that runs here; the backends that cannot."""
    rows, unavailable = [], []
    for backend in case.dispatch.backends:
        reasons = {dtype: case.explain(device, dtype)[backend]
                   for dtype in _dtypes(case, backend, device)}
        runnable = [dtype for dtype, why in reasons.items() if not why]
        for dtype in runnable:
            rows += _run_check(case, backend, device, dtype, seed)
        if not runnable:
            why = min(reasons.values(), key=len, default=["no dtype to check"])  # the root cause
            unavailable.append({"op": case.op, "backend": backend, "reasons": why})
    return rows, unavailable


def _run_check(case: Case, backend: str, device: torch.device, dtype: torch.dtype,
               seed: int) -> list[dict]:
    def row(what, error, allowed, passed, message=None):
        return {"op": case.op, "dispatch": case.dispatch.op, "backend": backend,
                "dtype": str(dtype).removeprefix("torch."), "what": what, "error": error,
                "allowed": allowed, "passed": passed, "message": message}

    generator = torch.Generator().manual_seed(seed)  # the same inputs for every backend
    try:
        errors = case.check(backend, device, dtype, generator)
    except Exception as error:  # a backend that raises is a failed check, not a crash
        where = traceback.extract_tb(error.__traceback__)[-1]
        return [row("run", None, None, False,
                    f"{type(error).__name__}: {error} ({where.filename}:{where.lineno})")]
    return [row(what, error, allowed, bool(error <= allowed))
            for what, (error, allowed) in errors.items()]


def _document(device, cases, rows, unavailable, seed, seconds) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "device_type": device.type,
        "capability": list(torch.cuda.get_device_capability(device)) if cuda else None,
        "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "seed": seed,
        "seconds": round(seconds, 2),
        "complete": len(cases) == len(CASES),
        "passed": all(row["passed"] for row in rows),
        "rows": rows,
        "unavailable": unavailable,
        "gpu_status": {case.op: {b: _verified.gpu_status(case.dispatch.op, b)
                                 for b in _verified.GPU_BACKENDS if b in case.dispatch.backends}
                       for case in cases},
    }


def _cells(row: dict) -> tuple[str, ...]:
    error = "-" if row["error"] is None else f"{row['error']:.2e}"
    allowed = "-" if row["allowed"] is None else f"{row['allowed']:.2e}"
    return (row["op"], row["backend"], row["dtype"], row["what"], error, allowed,
            "ok" if row["passed"] else "FAIL")


def format_report(document: dict) -> str:
    """The table of rows, then what could not run, the GPU status, and the verdict."""
    cells = [_COLUMNS] + [_cells(row) for row in document["rows"]]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.rjust(w) if i in (4, 5) else c.ljust(w)
                       for i, (c, w) in enumerate(zip(line, widths))).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for row in document["rows"]:
        if row["message"]:
            lines.append(f"{row['op']} {row['backend']} {row['dtype']}: {row['message']}")
    lines.append("")
    ops = [row["op"] for row in document["rows"]] + [u["op"] for u in document["unavailable"]]
    everything = list(dict.fromkeys(ops))
    not_run = _group((u["backend"], "; ".join(u["reasons"]), u["op"])
                     for u in document["unavailable"])
    lines += [f"not run: {backend} for {_ops_text(ops, everything)}: {why}"
              for (backend, why), ops in not_run.items()]
    status = _group((backend, text, op) for op, statuses in document["gpu_status"].items()
                    for backend, text in statuses.items())
    lines += [f"GPU status: {backend} for {_ops_text(ops, everything)}: {text}"
              for (backend, text), ops in status.items()]
    failed = sum(not row["passed"] for row in document["rows"])
    verdict = f"{failed} FAILED" if failed else "all passed"
    lines.append(f"device {document['device']}: {len(document['rows'])} checks, {verdict} "
                 f"in {document['seconds']:.1f} s")
    return "\n".join(lines)


def _group(triples) -> dict[tuple[str, str], list[str]]:
    """(backend, text, op) triples -> {(backend, text): [ops]}, in first-seen order."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for backend, text, op in triples:
        grouped.setdefault((backend, text), []).append(op)
    return grouped


def _ops_text(ops: list[str], everything: list[str]) -> str:
    return "every op" if len(ops) > 1 and ops == everything else ", ".join(ops)
