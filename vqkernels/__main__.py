"""``python -m vqkernels info | selftest | bench | demo``: what was built, is it right, how fast.

    python -m vqkernels info [--json]
    python -m vqkernels selftest [--device cpu|cuda] [--ops OP ...] [--json PATH]
    python -m vqkernels bench [--ops timestep ...] [--device cpu|cuda] [--quick]
                              [--json PATH] [--plot PATH]
    python -m vqkernels demo [--device cpu|cuda] [--out DIR] [--quick] [--seed N]
                             [--backend auto|reference|cpu|cuda|triton] [--threads N]
                             [--no-progress]
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from vqkernels._info import format_info, info_dict
from vqkernels._selftest import OPS as SELFTEST_OPS
from vqkernels._selftest import selftest
from vqkernels.bench.cases import OP_MODULES


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vqkernels", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="what was built and which backend each op uses here")
    info.add_argument("--json", action="store_true", help="print the info as JSON")
    _add_selftest(commands)
    bench = commands.add_parser("bench", help="time every backend against the reference")
    bench.add_argument("--ops", nargs="+", choices=sorted(OP_MODULES), default=sorted(OP_MODULES),
                       metavar="OP", help=f"op families to run (default all: {sorted(OP_MODULES)})")
    _add_device(bench, "run on")
    bench.add_argument("--quick", action="store_true",
                       help="smallest shapes and short timing budgets (a smoke run)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speed-ups here")
    _add_demo(commands)
    return parser


def _add_device(parser, verb: str) -> None:
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help=f"device to {verb} (default: cuda if available, else cpu)")


def _add_demo(commands) -> None:
    parser = commands.add_parser(
        "demo", help="train a VQ tokenizer and a latent DiT on scikit-learn's digits, sample, "
                     "judge; exits 1 if a threshold is missed")
    _add_device(parser, "run on")
    parser.add_argument("--out", metavar="DIR", default="vqkernels-demo",
                        help="where metrics.json and the PNG grids go (default: vqkernels-demo)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps and samples, lower thresholds (a CI smoke run)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every draw (default 0)")
    parser.add_argument("--backend", choices=("auto", "reference", "cpu", "cuda", "triton"),
                        default=None, help="backend of every vqkernels op "
                                           "(default: $VQKERNELS_BACKEND, else auto)")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads for the run (default: torch's; on a machine "
                             "busy with other jobs 1 avoids OpenMP waits)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _add_selftest(commands) -> None:
    parser = commands.add_parser(
        "selftest", help="every op on every backend usable here against the float64 reference; "
                         "exits 1 if any check fails")
    _add_device(parser, "check")
    parser.add_argument("--ops", nargs="+", choices=SELFTEST_OPS, default=None, metavar="OP",
                        help=f"ops to check (default all: {list(SELFTEST_OPS)})")
    parser.add_argument("--json", metavar="PATH",
                        help="write the rows, device, versions and date as JSON here")


def _selftest(args) -> int:
    rows = selftest(args.device, ops=args.ops, json_path=args.json)
    if args.json:
        print(f"wrote {args.json}")
    return 0 if all(row["passed"] for row in rows) else 1


def _info(args) -> int:
    data = info_dict()
    print(json.dumps(data, indent=2, default=str) if args.json else format_info(data))
    return 0


def _bench(args) -> int:
    from vqkernels.bench import report, runner
    from vqkernels.bench.cases import load_cases

    device = torch.device(args.device)
    ceilings = runner.device_ceilings(device)
    cases = load_cases(list(dict.fromkeys(args.ops)), device, args.quick)
    failures: list[dict] = []
    rows = runner.run(cases, device, ceilings, args.quick, failures=failures)
    meta = report.metadata(ceilings, args.quick, report.skipped_backends(cases))
    meta["failed"] = failures
    print(report.format_table(rows, meta))
    if args.json:
        report.write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    if args.plot:
        if report.write_plot(args.plot, rows, meta):
            print(f"wrote {args.plot}")
        else:
            print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
    for failure in failures:
        print(f"FAILED: {failure['op']} {failure['shape']} {failure['backend']}: "
              f"{failure['error']}", file=sys.stderr)
    return 1 if failures else 0


def _demo(args) -> int:
    from vqkernels.demo import run_demo
    from vqkernels.demo.data import MissingExtraError
    from vqkernels.demo.report import format_checks

    try:
        results = run_demo(args.out, device=args.device, quick=args.quick, seed=args.seed,
                           backend=args.backend, threads=args.threads,
                           progress=not args.no_progress)
    except MissingExtraError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_checks(results))
    verdict = "passed" if results["passed"] else "FAILED"
    print(f"{verdict} in {results['timings']['total_s']:.1f} s; "
          f"wrote {', '.join(results['files'])} in {args.out}")
    return 0 if results["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.command in ("bench", "selftest", "demo") and args.device == "cuda"
            and not torch.cuda.is_available()):
        parser.exit(2, "error: --device cuda: no CUDA GPU is available here "
                       "(torch.cuda.is_available() is False); use --device cpu\n")
    commands = {"info": _info, "selftest": _selftest, "bench": _bench, "demo": _demo}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
