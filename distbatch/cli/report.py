"""`distbatch report DIR`: rebuild a sweep's report.md and plots from its results.jsonl
(distbatch.measure.report builds them)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from distbatch.errors import UsageError
from distbatch.measure.report import build_report
from distbatch.measure.results import JSONL_NAME


def add_report_parser(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Register ``distbatch report DIR [--target-accuracy X]``; the handler is ``args.handler``."""
    parser = subparsers.add_parser(
        "report", help="rebuild report.md and plots from DIR/results.jsonl (never trains)",
        description="Rebuild report.md and the PNG plots of a sweep from its results.jsonl.")
    parser.add_argument("dir", metavar="DIR", help="sweep output directory holding results.jsonl")
    parser.add_argument("--target-accuracy", type=float, default=None, metavar="X",
                        help="validation accuracy target in (0, 1] to state in the report")
    parser.add_argument("--tolerance", type=float, default=1.0, metavar="POINTS",
                        help="accuracy tolerance in percentage points for the best-batch pick (1.0)")
    parser.add_argument("--machine", default=None, help="machine description for the report")
    parser.set_defaults(handler=run_report)
    return parser


def validate_report_args(args: argparse.Namespace) -> None:
    """The numeric flags of `distbatch report`."""
    target = args.target_accuracy
    if target is not None and not 0 < target <= 1:
        raise UsageError(f"--target-accuracy must be a fraction in (0, 1], got {target}")
    if not (math.isfinite(args.tolerance) and 0 <= args.tolerance <= 100):
        raise UsageError(f"--tolerance must be in [0, 100] accuracy points, got {args.tolerance}")


def run_report(args: argparse.Namespace) -> int:
    """Handler of ``distbatch report``: validate, build, print the report path, return 0."""
    validate_report_args(args)
    target = args.target_accuracy
    directory = Path(args.dir)
    if not directory.is_dir():
        raise UsageError(f"report directory not found: {args.dir!r}")
    if not (directory / JSONL_NAME).is_file():
        raise UsageError(f"{args.dir!r} has no {JSONL_NAME}; expected a `distbatch sweep --out` directory")
    path = build_report(directory, target_accuracy=target, machine=args.machine,
                        tolerance_points=args.tolerance)
    print(f"wrote {path}")
    return 0
