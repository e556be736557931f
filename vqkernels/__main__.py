"""``python -m vqkernels info | selftest | bench``: what was built, is it right, how fast is it.

    python -m vqkernels info [--json]
    python -m vqkernels selftest [--device cpu|cuda] [--ops OP ...] [--json PATH]
    python -m vqkernels bench [--ops timestep ...] [--device cpu|cuda] [--quick]
                              [--json PATH] [--plot PATH]
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
    bench.add_argument("--device", choices=("cpu", "cuda"),
                       default="cuda" if torch.cuda.is_available() else "cpu",
                       help="device to run on (default: cuda if available, else cpu)")
    bench.add_argument("--quick", action="store_true",
                       help="smallest shapes and short timing budgets (a smoke run)")
    bench.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    bench.add_argument("--plot", metavar="PATH", help="write a PNG bar chart of speed-ups here")
    return parser


def _add_selftest(commands) -> None:
    parser = commands.add_parser(
        "selftest", help="every op on every backend usable here against the float64 reference; "
                         "exits 1 if any check fails")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="device to check (default: cuda if available, else cpu)")
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
    rows = runner.run(cases, device, ceilings, args.quick)
    meta = report.metadata(ceilings, args.quick)
    print(report.format_table(rows, meta))
    if args.json:
        report.write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    if args.plot:
        if report.write_plot(args.plot, rows, meta):
            print(f"wrote {args.plot}")
        else:
            print("matplotlib is not installed: skipping the plot (pip install matplotlib)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.command in ("bench", "selftest") and args.device == "cuda"
            and not torch.cuda.is_available()):
        parser.exit(2, "error: --device cuda: no CUDA GPU is available here "
                       "(torch.cuda.is_available() is False); use --device cpu\n")
    commands = {"info": _info, "selftest": _selftest, "bench": _bench}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
