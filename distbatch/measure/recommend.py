"""`distbatch recommend`: measure the gradient noise scale and the throughput,
then suggest a global batch size with its learning rate and warmup.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training",
arXiv:1812.06162, sec. 2.2) model the steps S and the examples E = B*S needed
to reach a given loss at batch B as

    S = S_min (1 + B_noise / B),     E = E_min (1 + B / B_noise),
    so  (S / S_min - 1) (E / E_min - 1) = 1,   B_crit = E_min / S_min ~ B_noise.

At B = B_crit a run needs 2x the minimum number of steps AND 2x the minimum
number of examples: below it, doubling the batch nearly halves the steps
(perfect scaling, Shallue et al. 2019); above it, extra examples buy few
steps. B_noise is estimated by the simple noise scale B_simple = tr(Sigma)/|G|^2
(distbatch.measure.noise), measured during a short real training run.

With the measured throughput T(B) (samples/s on this machine), the predicted
time to the same loss is S(B) * B / T(B) = S_min (B + B_noise) / T(B); the
batch minimising it is reported as the fastest, next to the recommended one.
"""
from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import Mapping

from distbatch.cli.train import add_train_args, config_from_args
from distbatch.errors import UsageError, require
from distbatch.fileio import atomic_write_json
from distbatch.outdir import check_out_dir, claim_out_dir
from distbatch.training.config import TrainConfig

DEFAULT_BATCHES = "32,64,128,256,512"
RECOMMENDATION_NAME = "recommendation.json"
# Goyal et al. 2017: 5 warmup epochs of 90; distbatch's recipe default is the same fraction.
WARMUP_FRACTION = 5 / 90


@dataclass(frozen=True)
class Recommendation:
    """The suggested global batch and what the trade-off model predicts around it."""

    b_simple: float
    global_batch_size: int
    reason: str
    fastest_batch_size: int | None
    rows: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def round_to_power_of_two(x: float) -> int:
    """Nearest power of two on a log scale: 2 ** round(log2 x), at least 1."""
    require(math.isfinite(x) and x > 0, f"cannot round {x!r} to a power of two; expected a number > 0")
    return max(1, 2 ** int(round(math.log2(x))))


def tradeoff(batch: float, b_crit: float) -> tuple[float, float]:
    """(S/S_min, E/E_min) at `batch` = (1 + B_crit/B, 1 + B/B_crit); their excesses multiply to 1."""
    return 1.0 + b_crit / batch, 1.0 + batch / b_crit


def recommend_batch(b_simple: float | None, throughputs: Mapping[int, float | None], *,
                    replicas: int = 1) -> Recommendation:
    """The recommended global batch from B_simple and measured throughputs.

    ``throughputs`` maps each tried global batch to its samples/s, or None when
    it could not run (out of memory). Feasible batches are the measured ones
    below the smallest failed one. The recommendation is B_simple rounded to a
    power of two, clamped to [smallest, largest] feasible batch, and a multiple
    of ``replicas``.
    """
    if b_simple is None or not (isinstance(b_simple, (int, float)) and math.isfinite(b_simple)
                                and b_simple > 0):
        raise UsageError(f"the gradient noise scale must be a finite number > 0, got {b_simple!r}; "
                         "measure it over more steps (--noise-steps) or at a larger batch "
                         "(--noise-batch-size)")
    require(replicas >= 1, f"replicas must be >= 1, got {replicas}")
    failed = [b for b, t in throughputs.items() if t is None]
    cap = min(failed) if failed else math.inf
    feasible = sorted(b for b, t in throughputs.items() if t is not None and t > 0 and b < cap)
    require(bool(feasible), f"no batch size ran (throughputs {dict(sorted(throughputs.items()))}); "
                            "try smaller --batch-sizes")
    lo, hi = feasible[0], feasible[-1]
    target = round_to_power_of_two(b_simple)
    if target < lo:
        batch = lo
        reason = (f"B_simple = {b_simple:.1f} is below the smallest measured batch {lo}: "
                  f"larger batches mostly add examples, not speed")
    elif target > hi:
        batch = hi
        reason = (f"B_simple = {b_simple:.1f} (~{target}) is above the largest batch that ran here "
                  f"({hi}): batches up to ~{target} would still cut the steps nearly linearly "
                  f"(more replicas, or gradient accumulation)")
    else:
        batch = target
        reason = f"B_simple = {b_simple:.1f}, rounded to the power of two {target}"
    if batch % replicas:
        batch = max(replicas, batch // replicas * replicas)
        reason += f", then to a multiple of {replicas} replicas ({batch})"

    # Predicted time to the same loss ~ S(B) * B / T(B) = S_min (B + B_noise) / T(B).
    times = {b: (b + b_simple) / throughputs[b] for b in feasible}
    best_time = min(times.values())
    rows = []
    for b in sorted(throughputs):
        steps, examples = tradeoff(b, b_simple)
        rows.append({"global_batch_size": b, "samples_per_sec": throughputs[b],
                     "steps_vs_min": steps, "examples_vs_min": examples,
                     "time_vs_fastest": times[b] / best_time if b in times else None})
    fastest = min(times, key=times.get)
    return Recommendation(b_simple=float(b_simple), global_batch_size=int(batch), reason=reason,
                          fastest_batch_size=fastest, rows=rows)


def warmup_for(batch: int, base_batch_size: int, *, epochs: float | None = None,
               steps: int | None = None) -> dict:
    """Goyal et al. 2017 gradual warmup when the lr is scaled up (batch > base batch), else none.

    Length: 5/90 of the planned training (their 5 of 90 epochs), in the
    planned run's unit (epochs or steps).
    """
    if batch <= base_batch_size:
        return {"warmup": "none"}
    if steps is not None:
        return {"warmup": "gradual", "warmup_steps": int(math.floor(steps * WARMUP_FRACTION + 0.5))}
    epochs = 10.0 if epochs is None else epochs
    return {"warmup": "gradual", "warmup_epochs": round(epochs * WARMUP_FRACTION, 4)}


# Written by suggested_command itself (or meaningless for a new run), never copied from the flags.
_NOT_COPIED = {"global_batch_size", "max_global_batch_size", "batch_size_schedule", "epochs", "steps", "warmup", "warmup_epochs",
               "warmup_steps", "out", "resume", "overwrite", "help"}


def _fmt(value) -> str:
    """A flag value as a user would type it: 20.0 -> '20', 0.05 -> '0.05'."""
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value)


def suggested_command(args: argparse.Namespace, batch: int, warmup: dict) -> list[str]:
    """The complete `distbatch train` command line for the recommended batch (a pure function).

    Complete means it runs as pasted: the measured run's dataset, its sizes and seeds, the
    backend and every other `train` flag whose value differs from train's default are
    carried over (enumerated from train's own parser, so new flags are covered), plus
    the recommended batch, warmup, the planned length, and an --out directory.
    """
    from distbatch.cli.train import add_train_args
    train_parser = argparse.ArgumentParser(add_help=False)
    add_train_args(train_parser)
    cmd = ["distbatch", "train", "--dataset", str(args.dataset), "--model", str(args.model),
           "--global-batch-size", str(batch), "--optimizer", str(args.optimizer),
           "--base-lr", f"{args.base_lr:g}", "--base-batch-size", str(args.base_batch_size),
           "--scaling", str(args.scaling), "--warmup", warmup["warmup"]]
    if "warmup_epochs" in warmup:
        cmd += ["--warmup-epochs", f"{warmup['warmup_epochs']:g}"]
    if "warmup_steps" in warmup:
        cmd += ["--warmup-steps", str(warmup["warmup_steps"])]
    if getattr(args, "steps", None) is not None:
        cmd += ["--steps", str(args.steps)]
    else:
        epochs = getattr(args, "epochs", None)
        cmd += ["--epochs", f"{10.0 if epochs is None else epochs:g}"]
    written = {"dataset", "model", "optimizer", "base_lr", "base_batch_size", "scaling"}
    for action in train_parser._actions:
        dest = action.dest
        if dest in _NOT_COPIED or dest in written or not action.option_strings or not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value == action.default or value is None:
            continue
        written.add(dest)
        if action.nargs == 0:  # store_true / store_false: the flag itself says it
            cmd.append(action.option_strings[-1])
        else:
            cmd += [action.option_strings[-1], _fmt(value)]
    return cmd + ["--out", f"runs/train-bs{batch}"]


def add_recommend_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "recommend", help="measure the gradient noise scale and throughput; suggest a global batch",
        description=__doc__.split("\n\n")[0])
    p.add_argument("--noise-batch-size", type=int, default=64,
                   help="global batch of the noise-scale run (default 64; a moderate batch)")
    p.add_argument("--noise-steps", type=int, default=300,
                   help="steps of the noise-scale run (default 300)")
    p.add_argument("--batch-sizes", default=DEFAULT_BATCHES,
                   help=f"global batches whose throughput is measured (default {DEFAULT_BATCHES})")
    p.add_argument("--throughput-steps", type=int, default=30,
                   help="steps per throughput run; the first (compiling) step is not timed (default 30)")
    add_train_args(p, sweep=True)
    p.set_defaults(func=run_recommend, out="runs/recommend")
    for action in p._actions:  # --epochs/--steps here describe the PLANNED run (warmup, command)
        if action.dest == "epochs":
            action.help = "planned length of the real run, for the suggested warmup (default 10)"
        elif action.dest == "steps":
            action.help = "planned length of the real run in steps (instead of --epochs)"


def _sub_config(base: TrainConfig, batch: int, steps: int, out: str, noise: bool) -> TrainConfig:
    """One short measuring run; checkpoint_every=steps: one checkpoint at the end, not at
    every evaluation."""
    return base.replace(global_batch_size=batch, steps=steps, epochs=None, noise_scale=noise,
                        out=out, progress=False, target_accuracy=None, early_stopping_metric=None,
                        resume=False, overwrite=True, checkpoint_every=steps)


def validate_recommend_args(args: argparse.Namespace) -> tuple[list[int], TrainConfig]:
    """Every check of recommend's flags that needs no TensorFlow: the batch sizes and the
    TrainConfig its runs are derived from. ``args.epochs``/``args.steps`` stay the PLANNED
    run's (for the suggested warmup and command)."""
    from distbatch.cli.sweep import parse_batch_sizes
    batches = parse_batch_sizes(args.batch_sizes)
    require(args.noise_batch_size >= 2, f"--noise-batch-size must be >= 2, got {args.noise_batch_size}")
    require(args.noise_steps >= 10, f"--noise-steps must be >= 10, got {args.noise_steps}")
    require(args.throughput_steps >= 3, f"--throughput-steps must be >= 3, got {args.throughput_steps}")
    return batches, config_from_args(args, global_batch_size=args.noise_batch_size)


def run_recommend(args: argparse.Namespace) -> int:
    batches, base = validate_recommend_args(args)
    check_out_dir(args.out, resume=False, overwrite=args.overwrite,
                  holds=(RECOMMENDATION_NAME,))
    require(not args.resume, "--resume does not apply to recommend (its runs are short)")

    from distbatch.backends import create_backend
    from distbatch.training.plan import BatchPlan
    from distbatch.cli.train import train
    from distbatch.measure.oom import OutOfMemory
    from distbatch.recipes.schedules import scaled_learning_rate
    from distbatch.training.job import EXIT_DIVERGED, load_data

    backend, _ = create_backend(base.backend, cpu_replicas=base.cpu_replicas,
                                cluster_timeout=base.cluster_timeout)
    data = load_data(base)
    units = backend.num_replicas * args.accumulation_steps
    for flag, b in [("--noise-batch-size", args.noise_batch_size)] + [("--batch-sizes", b) for b in batches]:
        BatchPlan.derive(global_batch_size=b, replicas=backend.num_replicas,
                         accumulation_steps=args.accumulation_steps,
                         num_train_examples=len(data.x_train), flag=flag)
    if units == 1:
        require(args.noise_batch_size % 2 == 0,
                f"--noise-batch-size must be even on one replica (it is split in two), "
                f"got {args.noise_batch_size}")
    chief = backend.is_chief
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if chief else (lambda msg: None)

    if chief:  # its runs go in sub-directories, each replacing only its own files
        claim_out_dir(args.out, "recommend")
    say(f"distbatch recommend: {backend.describe()}; noise scale over {args.noise_steps} steps "
        f"at global batch {args.noise_batch_size}")
    noise_out = os.path.join(args.out, "noise")
    summary, code = train(_sub_config(base, args.noise_batch_size, args.noise_steps, noise_out, True),
                          backend=backend, data=data)
    if code == EXIT_DIVERGED:
        say("distbatch recommend: the noise-scale run diverged; lower --base-lr or add warmup")
        return EXIT_DIVERGED
    b_simple = summary.get("b_simple")
    say(f"distbatch recommend: B_simple = {b_simple if b_simple is None else round(b_simple, 2)} "
        f"(val accuracy {summary.get('val_accuracy')})")

    throughputs: dict[int, float | None] = {}
    for b in batches:
        try:
            s, c = train(_sub_config(base, b, args.throughput_steps,
                                   os.path.join(args.out, "throughput", f"bs{b}"), False),
                         backend=backend, data=data)
            throughputs[b] = s.get("samples_per_sec") if c == 0 else None
        except OutOfMemory:
            throughputs[b] = None
        say(f"distbatch recommend: global batch {b}: "
            + (f"{throughputs[b]:,.0f} samples/s" if throughputs[b] else "did not run"))

    rec = recommend_batch(b_simple, throughputs, replicas=units)
    lr = scaled_learning_rate(args.base_lr, args.base_batch_size, rec.global_batch_size, args.scaling)
    warmup = warmup_for(rec.global_batch_size, args.base_batch_size, epochs=args.epochs,
                        steps=args.steps)
    command = suggested_command(args, rec.global_batch_size, warmup)
    result = {**rec.as_dict(), "peak_lr": lr, "scaling_rule": args.scaling,
              "base_lr": args.base_lr, "base_batch_size": args.base_batch_size, **warmup,
              "command": command,
              "noise_run": {"global_batch_size": args.noise_batch_size, "steps": args.noise_steps,
                            "b_simple_trajectory": summary.get("b_simple_trajectory"),
                            "val_accuracy": summary.get("val_accuracy")},
              "backend": backend.name, "replicas": backend.num_replicas, "dataset": args.dataset,
              "model": args.model}
    if chief:
        print(format_report(result))
        atomic_write_json(os.path.join(args.out, RECOMMENDATION_NAME), result)
    return 0


def format_report(result: dict) -> str:
    """The human-readable recommendation: table, choice, lr, warmup, and the trade-off."""
    b, bs = result["global_batch_size"], result["b_simple"]
    lines = [f"Gradient noise scale B_simple = {bs:.1f} (critical batch B_crit ~ B_simple; "
             f"measured at global batch {result['noise_run']['global_batch_size']})", "",
             f"{'batch':>7} {'samples/s':>11} {'steps/S_min':>12} {'examples/E_min':>15} "
             f"{'time/fastest':>13}"]
    for r in result["rows"]:
        t = "-" if r["samples_per_sec"] is None else f"{r['samples_per_sec']:,.0f}"
        rel = "-" if r["time_vs_fastest"] is None else f"{r['time_vs_fastest']:.2f}"
        lines.append(f"{r['global_batch_size']:>7} {t:>11} {r['steps_vs_min']:>12.2f} "
                     f"{r['examples_vs_min']:>15.2f} {rel:>13}")
    steps, examples = tradeoff(b, bs)
    warm = (f"gradual warmup over {result.get('warmup_epochs', result.get('warmup_steps'))} "
            f"{'epochs' if 'warmup_epochs' in result else 'steps'} (Goyal et al. 2017)"
            if result["warmup"] != "none" else "no warmup (lr not scaled up)")
    lines += ["",
              f"Recommended global batch: {b} ({result['reason']}).",
              f"Learning rate: {result['peak_lr']:.4g} ({result['scaling_rule']} scaling from "
              f"{result['base_lr']:g} at batch {result['base_batch_size']}), {warm}.",
              f"Predicted cost at {b}: {steps:.2f}x the minimum steps and {examples:.2f}x the "
              f"minimum examples ((S/S_min - 1)(E/E_min - 1) = 1; both are 2x at B = B_crit).",
              "Smaller batches spend fewer examples but more steps; larger ones fewer steps "
              "for more examples (McCandlish et al. 2018).",
              f"Fastest measured batch on this machine (S_min (B + B_simple) / throughput): "
              f"{result['fastest_batch_size']}.",
              "Command: " + shlex.join(result["command"])]
    return "\n".join(lines)
