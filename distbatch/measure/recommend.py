"""The batch-size recommendation from a measured gradient noise scale and throughput
(`distbatch recommend`, distbatch/cli/recommend.py, runs the measurements).

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

import math
import shlex
from dataclasses import asdict, dataclass, field
from typing import Mapping

from distbatch.errors import UsageError, require

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
