"""The `distbatch` command. Each subcommand lives in its own module; this file
only wires them and turns user errors into one line and exit status 2."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

from distbatch import __version__, interrupts
from distbatch.errors import (EXIT_IO, ClusterSetupError, ParameterError, RanksDriftedError, UsageError,
                              flag_names, io_failure_message, peer_failure_message)
from distbatch.exit_records import record_exit_code
from distbatch.cli.flags import FLAG_NAMES
from distbatch.training.preemption import EXIT_PREEMPTED, Preempted

QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",        # C++ INFO/WARNING (oneDNN notices, CUDA probing)
    "GRPC_VERBOSITY": "ERROR",
    "ABSL_MIN_LOG_LEVEL": "3",
}


def quiet_tensorflow(import_now: bool = True) -> None:
    """Silence TensorFlow's start-up noise unless the user asked for --verbose.

    TF 2.21 prints some notices (oneDNN, absl pre-init) before it reads
    TF_CPP_MIN_LOG_LEVEL, so the import itself runs with file descriptor 2
    pointed at /dev/null; real errors after start-up still reach stderr.
    """
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    if import_now and "tensorflow" not in sys.modules:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, 2)
            import tensorflow  # noqa: F401 - this function's job: the import, with stderr silenced
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            os.close(devnull)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="keras")
    warnings.filterwarnings("ignore", module="tensorflow")


def _train(args) -> int:
    from distbatch.cli.train import train  # the command's module, imported when it runs
    return train(args)[1]


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with errors on ONE line, like every other distbatch error.

    Stock argparse prints the whole usage block (30 lines for `train`) before
    the message, burying it. Subparsers inherit this class (argparse makes
    them with ``type(parent)``), so `distbatch train --backend bogus` prints
    ``distbatch: error: argument --backend: invalid choice: 'bogus' (...)`` and exits 2.
    """

    def error(self, message: str):
        self.exit(2, f"distbatch: error: {message} (see `{self.prog} --help`)\n")


SUBCOMMANDS = (  # (name, module, function adding its parser)
    ("sweep", "distbatch.cli.sweep", "add_sweep_parser"),
    ("bench", "distbatch.cli.bench", "add_bench_parser"),
    ("report", "distbatch.cli.report", "add_report_parser"),
    ("recommend", "distbatch.cli.recommend", "add_recommend_parser"),
    ("probe-batch", "distbatch.cli.probe", "add_probe_parser"),
    ("launch", "distbatch.cli.launch", "add_launch_parser"),
    ("plan", "distbatch.cli.plan", "add_plan_parser"),
)
# Subcommands whose process never needs TensorFlow (the launcher only starts workers; plan's
# probe runs `distbatch bench` in child processes).
NO_TENSORFLOW = {"launch", "report", "plan"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The full parser, or (when `command` is known) just that subcommand's,
    so `distbatch launch` does not pay for importing TensorFlow."""
    parser = OneLineArgumentParser(
        prog="distbatch",
        description="Data-parallel TensorFlow training and batch-size measurement.")
    parser.add_argument("--version", action="version", version=f"distbatch {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's own start-up and log messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    if command in (None, "train"):
        from distbatch.cli.train import add_train_args  # only the parsers this command needs
        p = sub.add_parser("train", help="train one model at one global batch size")
        add_train_args(p)
        p.set_defaults(func=_train)
    for name, module, fn in SUBCOMMANDS:
        if command in (None, name):
            mod = __import__(module, fromlist=[fn])
            getattr(mod, fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `distbatch` command; returns its exit status (see docs/reliability.md)."""
    code, stop_now = 1, False  # an uncaught exception ends the process with status 1
    try:
        with flag_names(FLAG_NAMES):  # messages name the flags the library calls parameters
            code, stop_now = _run(list(sys.argv[1:] if argv is None else argv))
        return code
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else 1
        raise
    finally:
        # Under horovodrun/mpirun: tell the launcher this rank's own status (horovodrun
        # reports any failure as 1).
        record_exit_code(code)
        if stop_now:
            interrupts.exit_now_if_installed(code)


def _run(argv: list[str]) -> tuple[int, bool]:
    """(exit status, whether a signal stopped the command)."""
    known = {"train", *(name for name, _, _ in SUBCOMMANDS)}
    command = next((a for a in argv if not a.startswith("-")), None)
    command = command if command in known else None
    # Parsing (and --help, and argparse's errors) needs no TensorFlow: nothing that
    # builds the parsers imports it, so `distbatch --help` takes a fraction of a second.
    args = build_parser(command).parse_args(argv)
    needs_tensorflow = command not in NO_TENSORFLOW
    if not args.verbose:
        quiet_tensorflow(import_now=needs_tensorflow)
    else:
        os.environ["DISTBATCH_VERBOSE"] = "1"  # launchers pass TensorFlow's own lines on
    if needs_tensorflow:  # the launcher's supervisor handles its own signals
        interrupts.install()
    try:
        handler = getattr(args, "func", None) or args.handler
        code = handler(args)
    except UsageError as e:
        if isinstance(e, ParameterError):  # the library names its parameter; the user gave a flag
            e = e.for_flags(FLAG_NAMES)
        print(f"distbatch: error: {e}", file=sys.stderr)
        return 2, False
    except (ClusterSetupError, RanksDriftedError) as e:
        print(f"distbatch: error: {e}", file=sys.stderr)
        return 1, False
    except Preempted as e:  # every worker saved at the same step (distbatch/training/preemption.py)
        print(f"distbatch: {e.message()}", file=sys.stderr)
        return EXIT_PREEMPTED, True
    except KeyboardInterrupt as e:
        signum = e.signum if isinstance(e, interrupts.Terminated) else 2
        print(f"distbatch: stopped by {e}" if signum != 2 else "distbatch: interrupted",
              file=sys.stderr)
        return 128 + signum, True
    except Exception as e:  # a peer worker died, or the disk refused: one line, not a traceback
        message = peer_failure_message(e)
        if message is not None:
            print(f"distbatch: error: {message}", file=sys.stderr)
            return 1, False
        message = io_failure_message(e)
        if message is None:
            raise
        print(f"distbatch: error: {message}", file=sys.stderr)
        return EXIT_IO, False
    return int(code or 0), False


if __name__ == "__main__":
    sys.exit(main())
