"""``python -m vqkernels.bench.summary``: the one-page verdict of ``scripts/gpu_check.sh``.

A GPU session may be cut off at any step, so this reads whatever the run left
(the steps file, the junit XML of ``pytest -m cuda`` or else its ``-v`` log,
the selftest JSON, the compute-sanitizer log, bench.json; any may be missing)
and always writes summary.md: per op family and backend the parity, memcheck,
speed-ups against ``vqkernels.bench.targets`` and % of ceiling, plus the
steps, the targets, the ``auto`` orders and what failed (``format_summary``).
With ``--fill-missing`` it also writes "not run" stand-ins for a missing
bench.json, bench.png and junit XML, so the output folder always holds the
same files.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from vqkernels.bench import evidence, placeholders, targets
from vqkernels.bench.evidence import FAMILIES, Memcheck, Step, TestResult
from vqkernels.bench.report import describe_ceilings

STEP_ORDER = ("nvidia-smi", "build", "info", "selftest", "pytest-cuda", "sanitizer", "bench")
# Problems listed, each cut to a line: the run tool returns only the last 12,000 characters of
# the script's output, and summary.md is printed last.
_LIST_LIMIT, _ITEM_CHARS = 15, 200


@dataclass
class Evidence:
    """Everything one gpu_check run left behind, each part None when it is missing."""

    steps: dict[str, Step]
    tests: list[TestResult] | None
    tests_from: str  # "junit", "log" (cut short: read from pytest -v output) or ""
    selftest: dict | None
    memcheck: Memcheck | None
    bench: dict | None
    machine: str  # what the script found: the GPU, or why there is none


def gather(args: argparse.Namespace) -> Evidence:
    """Read every input named on the command line."""
    tests, tests_from = evidence.read_junit(args.junit), "junit"
    if tests is None:
        tests, tests_from = evidence.read_pytest_log(args.pytest_log), "log"
    bench = evidence.read_json(args.bench)
    return Evidence(steps=evidence.read_steps(args.steps), tests=tests,
                    tests_from=tests_from if tests is not None else "",
                    selftest=evidence.read_json(args.selftest),
                    memcheck=evidence.read_sanitizer_log(args.sanitizer_log),
                    bench=bench if bench and bench.get("rows") else None, machine=args.machine)


def format_summary(ev: Evidence) -> str:
    """summary.md: verdict, steps, the family x backend table, targets, auto orders, failures.

    Per op family and backend: parity (pytest and selftest: passed / failed /
    not run, with counts), memcheck (clean / errors / not run), the speed-ups
    against the targets of ``vqkernels.bench.targets`` and the % of the device
    ceiling (the table's and, on a GPU, the one measured at start). Then every
    target next to what the run measured, the ``auto`` backend orders the bench
    rows support, and what failed: tests, selftest checks, memcheck errors,
    ceiling problems.
    """
    rows = ev.bench["rows"] if ev.bench else []
    verdicts = targets.evaluate(rows)
    sections = [
        ["# gpu_check summary", "", f"Machine: {ev.machine}", ""] + _bench_header(ev)
        + [_verdict(ev, verdicts)],
        ["## Steps", ""] + _steps_table(ev.steps),
        ["## Per op family and backend", ""] + _family_table(ev, verdicts) + _notes(ev),
        ["## Targets (one run on an H100/H200)", ""] + _targets_table(ev, verdicts),
        ["## `auto` decisions the bench supports", ""] + _decisions(ev, rows),
        ["## Problems", ""] + _problems(ev, rows),
    ]
    return "\n\n".join("\n".join(section).rstrip() for section in sections) + "\n"


def _bench_header(ev: Evidence) -> list[str]:
    """Where the bench ran and the ceilings its percentages are of."""
    if ev.bench is None or "ceilings" not in ev.bench:
        return []
    quick = " (quick)" if ev.bench.get("quick") else ""
    return [f"Bench: {ev.bench.get('device', '?')}{quick}, {len(ev.bench['rows'])} rows; "
            + "; ".join(describe_ceilings(ev.bench["ceilings"])), ""]


def _verdict(ev: Evidence, verdicts: list[dict]) -> str:
    bad = [f"{s.name} ({s.status})" for s in ev.steps.values()
           if s.status in ("failed", "timed out")]
    not_run = [s.name for s in ev.steps.values() if s.status == "not run"]
    missed = sum(v["met"] is False for v in verdicts)
    parts = [f"steps not ok: {', '.join(bad)}" if bad else "every step that ran is ok"]
    if not_run:
        parts.append(f"not run: {', '.join(not_run)}")
    if missed:
        parts.append(f"{_plural(missed, 'target')} missed")
    return "**Verdict:** " + "; ".join(parts) + "."


def _steps_table(steps: dict[str, Step]) -> list[str]:
    names = [n for n in STEP_ORDER if n in steps] + [n for n in steps if n not in STEP_ORDER]
    lines = ["| step | status | exit | seconds | note |", "|---|---|---|---|---|"]
    for name in names:
        step = steps[name]
        status = step.status if step.status in ("ok", "not run") else f"**{step.status}**"
        lines.append(f"| {name} | {status} | {_or_dash(step.code)} | "
                     f"{'-' if step.seconds is None else f'{step.seconds:.1f}'} | {step.note} |")
    return lines if names else ["No steps file: the script did not record its steps."]


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _family_table(ev: Evidence, verdicts: list[dict]) -> list[str]:
    lines = ["| family | backend | pytest -m cuda | selftest | memcheck | speed-up vs target "
             "| % of ceiling |", "|---|---|---|---|---|---|---|"]
    for family in _families(ev):
        for backend in _backends(ev, family):
            lines.append(f"| {family} | {backend} | {_pytest_cell(ev, family, backend)} | "
                         f"{_selftest_cell(ev, family, backend)} | "
                         f"{_memcheck_cell(ev, family, backend)} | "
                         f"{_target_cell(verdicts, family, backend)} | "
                         f"{_ceiling_cell(ev, family, backend)} |")
    return lines


def _families(ev: Evidence) -> list[str]:
    extra = {t.family for t in ev.tests or ()} - set(FAMILIES)
    return list(FAMILIES) + sorted(extra)


def _backends(ev: Evidence, family: str) -> list[str]:
    found = {t.backend for t in ev.tests or () if t.family == family}
    found |= {r["backend"] for r in (ev.selftest or {}).get("rows", ())
              if evidence.selftest_family(r["op"]) == family}
    found |= {t.backend for t in (ev.memcheck.tests.values() if ev.memcheck else ())
              if t.family == family}
    found |= {r["backend"] for r in (ev.bench or {}).get("rows", ())
              if r["op"] == family and r["backend"] in targets.OURS}
    order = ("cuda", "triton", "vqkernels", "cpu", "reference", "any")
    return sorted(found, key=lambda b: (order.index(b) if b in order else len(order), b)) or ["-"]


def _not_run(ev: Evidence, step: str) -> str:
    """A table cell for a missing input: "not run (why)" or "no result (what happened)"."""
    found = ev.steps.get(step)
    if found is None:
        return "not run"
    if found.status == "not run":
        return f"not run ({found.note})" if found.note else "not run"
    return f"no result ({step} {found.status}, exit {found.code})"


def _why_missing(ev: Evidence, step: str) -> str:
    """Why an input is missing, in a sentence: "bench failed (exit 2)"."""
    found = ev.steps.get(step)
    if found is None:
        return f"{step} was not recorded"
    if found.status == "not run":
        return f"{step} not run" + (f" ({found.note})" if found.note else "")
    if found.status == "ok":
        return f"{step} wrote no results"
    return f"{step} {found.status} (exit {found.code})"


def _pytest_cell(ev: Evidence, family: str, backend: str) -> str:
    if ev.tests is None:
        return _not_run(ev, "pytest-cuda")
    counts = _count(t.outcome for t in ev.tests if (t.family, t.backend) == (family, backend))
    if not counts:
        return "no tests"
    cell = ", ".join(f"**{n} {o}**" if o in ("failed", "error") else f"{n} {o}"
                     for o, n in sorted(counts.items(), key=lambda kv: kv[0] not in
                                        ("failed", "error")))
    if ev.tests_from == "log":
        return cell + " (partial: from the log)"
    step = ev.steps.get("pytest-cuda")
    return cell + (" (partial: timed out)" if step and step.status == "timed out" else "")


def _count(outcomes) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def _selftest_cell(ev: Evidence, family: str, backend: str) -> str:
    if ev.selftest is None:
        return _not_run(ev, "selftest")
    checks = [r for r in ev.selftest.get("rows", ()) if r["backend"] == backend
              and evidence.selftest_family(r["op"]) == family]
    if not checks:
        why = [u for u in ev.selftest.get("unavailable", ()) if u["backend"] == backend
               and evidence.selftest_family(u["op"]) == family]
        return f"unavailable: {'; '.join(why[0]['reasons'])}" if why else "no checks"
    failed = sum(not r["passed"] for r in checks)
    return f"**{failed} failed** of {len(checks)}" if failed else f"{len(checks)} passed"


def _memcheck_cell(ev: Evidence, family: str, backend: str) -> str:
    if ev.memcheck is None:
        return _not_run(ev, "sanitizer")
    mine = [t for t in ev.memcheck.tests.values() if (t.family, t.backend) == (family, backend)]
    ran = [t.id for t in mine if t.outcome != "skipped"]  # a skipped test checked nothing
    if not ran:
        return f"no test ran ({len(mine)} skipped)" if mine else "no test ran"
    errors = sum(ev.memcheck.errors.get(test, 0) for test in ran)
    dirty = sum(test in ev.memcheck.errors for test in ran)
    if errors:
        return f"**{_plural(errors, 'error')}** in {dirty} of {_plural(len(ran), 'test')}"
    return f"clean ({_plural(len(ran), 'test')})"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _target_cell(verdicts: list[dict], family: str, backend: str) -> str:
    mine = [v for v in verdicts if v["row"] and v["target"].family == family
            and v["row"]["backend"] == backend and v["met"] is not None]
    if not mine:
        return "-"
    worst = min(mine, key=lambda v: v["value"] / targets.threshold(v["target"]))
    met = sum(v["met"] for v in mine)
    return (f"{met} of {len(mine)} met; worst {targets.format_value(worst)} vs "
            f"{worst['target'].needed} ({worst['row']['shape']})")


def _ceiling_cell(ev: Evidence, family: str, backend: str) -> str:
    rows = [r for r in (ev.bench or {}).get("rows", ()) if r["op"] == family
            and r["backend"] == backend]
    cell = _pct_range(rows, "ceiling_pct")
    measured = _pct_range(rows, "measured_ceiling_pct")
    if measured != "-":
        cell += f" (measured ceiling: {measured})"
    problems = sum(bool(r.get("ceiling_problem") or r.get("measured_ceiling_problem"))
                   for r in rows)
    return cell + (f"; {_plural(problems, 'ceiling problem')}" if problems else "")


def _pct_range(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return "-"
    low, high = min(values), max(values)
    return f"{low:.0f}%" if round(low) == round(high) else f"{low:.0f}-{high:.0f}%"


def _notes(ev: Evidence) -> list[str]:
    notes = []
    if ev.memcheck and ev.memcheck.total is not None:
        charged = sum(ev.memcheck.errors.values())
        outside = max(ev.memcheck.total - charged, ev.memcheck.outside_tests)
        if outside:
            notes.append(f"memcheck: {_plural(outside, 'error')} outside any test (collection, "
                         "teardown or exit): see sanitizer.log")
    elif ev.memcheck:
        notes.append("memcheck: no ERROR SUMMARY in the log (the run was cut short): "
                     "only the tests listed there count")
    if ev.bench is None:
        notes.append(f"No bench rows: {_why_missing(ev, 'bench')}.")
    return [""] + notes if notes else []


def _targets_table(ev: Evidence, verdicts: list[dict]) -> list[str]:
    if ev.bench is None:
        return [f"Not judged: {_why_missing(ev, 'bench')}."]
    device = {r.get("device") for r in ev.bench["rows"]}
    if targets.GPU_ONLY not in device:
        return [f"Not judged: the bench ran on {ev.bench.get('device', 'a CPU')}, the targets "
                "hold for one run on an H100/H200."]
    lines = ["| family | target | shape | backend | measured | needed | met |",
             "|---|---|---|---|---|---|---|"]
    for v in verdicts:
        target, row = v["target"], v["row"]
        if row is None:
            lines.append(f"| {target.family} | {target.what} | no row at this shape in this run "
                         f"| - | - | {target.needed} | not run |")
            continue
        measured = "no baseline row" if v["value"] is None else targets.format_value(v)
        met = "-" if v["met"] is None else "yes" if v["met"] else "**no**"
        lines.append(f"| {target.family} | {target.what} | {row['shape']} | {row['backend']} | "
                     f"{measured} | {target.needed} | {met} |")
    return lines


def _decisions(ev: Evidence, rows: list[dict]) -> list[str]:
    if ev.bench is None:
        return [f"None: {_why_missing(ev, 'bench')}."]
    lines = targets.auto_decisions(rows)
    return [f"- {line}" for line in lines] or ["None: no shape was timed on two kernel backends."]


def _problems(ev: Evidence, rows: list[dict]) -> list[str]:
    items = [f"test {t.outcome}: {t.id}" for t in ev.tests or ()
             if t.outcome in ("failed", "error")]
    items += [f"selftest failed: {r['op']} {r['backend']} {r['dtype']} {r['what']}"
              + (f": {r['message']}" if r.get("message") else "")
              for r in (ev.selftest or {}).get("rows", ()) if not r["passed"]]
    items += [f"memcheck: {_plural(n, 'error')} in {test}" for test, n in
              (ev.memcheck.errors.items() if ev.memcheck else ())]
    items += [f"ceiling problem: {r['op']} {r['shape']} {r['backend']}: {problem}"
              for r in rows for problem in (r.get("ceiling_problem"),
                                            r.get("measured_ceiling_problem")) if problem]
    shown = [f"- {_clip(item)}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        shown.append(f"- ... and {len(items) - _LIST_LIMIT} more (see logs.tar.gz)")
    return shown or ["None found in the evidence that exists (steps not run are listed above)."]


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ITEM_CHARS else text[:_ITEM_CHARS - 3] + "..."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vqkernels.bench.summary",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--steps", help="steps file: name, status, exit, seconds, note (TSV)")
    parser.add_argument("--junit", help="junit XML of pytest -m cuda")
    parser.add_argument("--pytest-log", help="pytest -v log, read when the junit XML is missing")
    parser.add_argument("--selftest", help="JSON of python -m vqkernels selftest")
    parser.add_argument("--sanitizer-log", help="compute-sanitizer memcheck log of pytest -v")
    parser.add_argument("--bench", help="bench.json of python -m vqkernels bench")
    parser.add_argument("--plot", help="bench.png (only with --fill-missing)")
    parser.add_argument("--machine", default="unknown", help="what the script found (GPU or not)")
    parser.add_argument("--out", required=True, help="where to write summary.md")
    parser.add_argument("--fill-missing", action="store_true",
                        help="write 'not run' placeholders for a missing bench JSON, plot, junit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    ev = gather(args)
    Path(args.out).write_text(format_summary(ev))
    if args.fill_missing:
        placeholders.fill(ev.steps, bench=args.bench, plot=args.plot, junit=args.junit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
