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
import statistics
from dataclasses import asdict, dataclass, field
from typing import Mapping

from distbatch.errors import ParameterError, UsageError, require, require_param
from distbatch.measure.results import b_simple_at_target, finite, is_ok, rule_of, summarize_rules
from distbatch.measure.sweep_points import DEFAULT_EPOCHS, DEFAULT_WARMUP_CAP, DEFAULT_WARMUP_EPOCHS

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
        raise ParameterError(f"the gradient noise scale must be a finite number > 0, got "
                             f"{b_simple!r}; measure it over more steps ({{noise_steps}}) or at a "
                             "larger batch ({noise_batch_size})", "noise_steps", "noise_batch_size")
    require(replicas >= 1, f"replicas must be >= 1, got {replicas}")
    failed = [b for b, t in throughputs.items() if t is None]
    cap = min(failed) if failed else math.inf
    feasible = sorted(b for b, t in throughputs.items() if t is not None and t > 0 and b < cap)
    require_param(bool(feasible), f"no batch size ran (throughputs "
                                  f"{dict(sorted(throughputs.items()))}); try smaller {{batch_sizes}}",
                  "batch_sizes")
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
    noise = result["noise_run"]
    read = (f", read at {100 * noise['target_accuracy']:g}% validation accuracy (step "
            f"{noise['steps_to_target']}) as the sweep's report reads it"
            if noise.get("b_simple_at_target") is not None else "")
    lines = [f"Gradient noise scale B_simple = {bs:.1f} (critical batch B_crit ~ B_simple; "
             f"measured at global batch {noise['global_batch_size']}{read})", "",
             f"{'batch':>7} {'samples/s':>11} {'steps/S_min':>12} {'examples/E_min':>15} "
             f"{'time/fastest':>13}"]
    for r in result["rows"]:
        t = "-" if r["samples_per_sec"] is None else f"{r['samples_per_sec']:,.0f}"
        rel = "-" if r["time_vs_fastest"] is None else f"{r['time_vs_fastest']:.2f}"
        lines.append(f"{r['global_batch_size']:>7} {t:>11} {r['steps_vs_min']:>12.2f} "
                     f"{r['examples_vs_min']:>15.2f} {rel:>13}")
    steps, examples = tradeoff(b, bs)
    warm = (f"gradual warmup over {result.get('warmup_epochs', result.get('warmup_steps')):g} "
            f"{'epochs' if 'warmup_epochs' in result else 'steps'} (Goyal et al. 2017)" if result["warmup"] != "none" else
            "no warmup (AdaScale's gain replaces it)" if result.get("scaling_rule") == "adascale"
            else "no warmup (lr not scaled up)")
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


# ------------------------------------------------------------- the sweep's answer
#
# A sweep measures, per scaling rule and global batch, the final accuracy, the optimizer steps
# to the target accuracy and the throughput. Its recommendation is chosen on the quantities
# that do not depend on how loaded the machine was: the time to the target (seconds of one
# device, 1-5 s in the default sweep) moves as much between identical runs as between batches,
# so it never decides.

@dataclass(frozen=True)
class SweepChoice:
    """The sweep's one recommendation and the evidence for it.

    ``eligible``: the (rule, batch) cells whose every run finished and reached the target with a
    mean final accuracy within the tolerance of the best cell. ``tied``: the eligible cells whose
    steps to the target cannot be told from the fewest (they differ by no more than the two
    cells' uncertainties, each the larger of its seed-to-seed std and its evaluation interval).
    ``throughput_used``: whether measured time per step separated the tied cells (only with
    several seeds, and only a difference larger than the measured spread).
    """

    rule: str | None
    global_batch_size: int
    steps_to_target: float
    val_accuracy: float
    best_val_accuracy: float
    tolerance_points: float
    eligible: tuple
    tied: tuple
    throughput_used: bool
    seeds: int


def steps_uncertainty(cell) -> float:
    """The larger of the seed-to-seed std of steps-to-target and the evaluation interval."""
    return max(cell.steps_to_target.std, float(cell.steps_resolution or 0))


def step_time(cell) -> tuple[float, float] | None:
    """(seconds per optimizer step, its std) from the measured samples/s (batch / samples/s);
    None without a throughput."""
    sps = cell.samples_per_sec
    if sps.mean is None or sps.mean <= 0:
        return None
    t = cell.global_batch_size / sps.mean
    return t, t * sps.std / sps.mean


def choose_from_sweep(cells, *, tolerance_points: float = 1.0) -> SweepChoice | None:
    """The rule and global batch that reach the target in the fewest optimizer steps, among the
    cells within ``tolerance_points`` of the best final accuracy; None if no cell qualifies.

    1. eligible: every run of the cell finished (no divergence, no OOM) and reached the target,
       and its mean final validation accuracy is within ``tolerance_points`` of the best cell's;
    2. fewest steps to the target, and every eligible cell within the combined uncertainty of
       it (:func:`steps_uncertainty`): these are indistinguishable on steps;
    3. among those, measured time per step (batch / samples/s) only separates cells whose
       difference exceeds their measured seed-to-seed spread (never with one seed, whose
       spread is unknown);
    4. of what remains, the smallest global batch (it spends the fewest examples and needs the
       fewest replicas for the same steps), then fewer steps, then higher accuracy.
    Time to the target is never used.
    """
    cells = [c for c in cells if c.val_accuracy.mean is not None]
    if not cells:
        return None
    best_acc = max(c.val_accuracy.mean for c in cells)
    eligible = [c for c in cells if c.ok == c.runs and c.steps_to_target.n == c.ok
                and c.steps_to_target.mean is not None
                and c.val_accuracy.mean >= best_acc - tolerance_points / 100 - 1e-12]
    if not eligible:
        return None
    fewest = min(eligible, key=lambda c: (c.steps_to_target.mean, c.global_batch_size))
    tied = [c for c in eligible if abs(c.steps_to_target.mean - fewest.steps_to_target.mean)
            <= steps_uncertainty(c) + steps_uncertainty(fewest)]
    remaining, used = tied, False
    times = {id(c): step_time(c) for c in tied}
    if len(tied) > 1 and all(times[id(c)] and c.samples_per_sec.n >= 2 for c in tied):
        quickest = min(tied, key=lambda c: times[id(c)][0])
        tq, sq = times[id(quickest)]
        remaining = [c for c in tied if times[id(c)][0] - tq <= times[id(c)][1] + sq]
        used = len(remaining) < len(tied)
    pick = min(remaining, key=lambda c: (c.global_batch_size, c.steps_to_target.mean,
                                         -c.val_accuracy.mean, c.rule or ""))
    return SweepChoice(pick.rule, pick.global_batch_size, pick.steps_to_target.mean,
                       pick.val_accuracy.mean, best_acc, tolerance_points,
                       tuple(eligible), tuple(tied), used, max(c.runs for c in cells))


# ------------------------------------------------------------- the critical batch

@dataclass(frozen=True)
class CriticalBatch:
    """The sweep's critical-batch estimates.

    ``predicted``: median B_simple (tr(Sigma)/|G|^2, McCandlish et al. 2018) read on each run's
    trajectory at the step it first reached the target, over ``source`` rows: "base" (the runs
    at the base batch, where every scaling rule trains the same way), "reached" (every run
    that reached the target, when the base batch was not swept) or "end" (the runs' final
    values: rows without a trajectory; these depend on how far each run trained).
    ``per_rule``: the same estimate from each rule's rows alone. ``fitted``: per rule,
    (B_crit, S_min, batches) of S(B) = S_min (1 + B_crit / B) fitted to the measured steps to
    the target, or None with fewer than 3 batches that reached it.
    """

    predicted: float | None
    source: str | None
    runs: int
    per_rule: dict
    fitted: dict


def predicted_critical_batch(rows: list[dict]) -> tuple[float | None, str | None, int]:
    """(median B_simple at the target, source, number of runs) of ``rows``; see CriticalBatch."""
    ok = [r for r in rows if is_ok(r)]
    at_target = [(r, b_simple_at_target(r)) for r in ok]
    at_target = [(r, v) for r, v in at_target if v is not None and v > 0]
    base = [v for r, v in at_target if finite(r.get("base_batch_size"))
            and r.get("global_batch_size") == r["base_batch_size"]]
    if base:
        return statistics.median(base), "base", len(base)
    if at_target:
        return statistics.median(v for _, v in at_target), "reached", len(at_target)
    end = [float(r["b_simple"]) for r in ok if finite(r.get("b_simple")) and r["b_simple"] > 0]
    if end:
        return statistics.median(end), "end", len(end)
    return None, None, 0


def fit_critical_batch(steps: Mapping[int, float]) -> tuple[float, float] | None:
    """(B_crit, S_min) of McCandlish et al.'s S(B) = S_min (1 + B_crit / B) fitted to measured
    steps-to-target per batch, by least squares on log S (steps vary by a factor, not an
    amount); None with fewer than 3 batches. B_crit is searched over [min batch / 1000,
    max batch * 1000]; an estimate at either end means the data do not bracket it."""
    points = sorted((int(b), float(s)) for b, s in steps.items() if s and s > 0)
    if len(points) < 3:
        return None
    logs = [math.log(s) for _, s in points]

    def fit(log_bc: float) -> tuple[float, float]:
        bc = math.exp(log_bc)
        shape = [math.log1p(bc / b) for b, _ in points]
        log_smin = statistics.fmean(ls - sh for ls, sh in zip(logs, shape))
        return sum((ls - log_smin - sh) ** 2 for ls, sh in zip(logs, shape)), log_smin

    lo, hi = math.log(points[0][0] / 1000), math.log(points[-1][0] * 1000)
    grid = [lo + (hi - lo) * i / 400 for i in range(401)]
    i = min(range(len(grid)), key=lambda k: fit(grid[k])[0])
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(80):  # golden-section search inside the best grid cell's neighbours
        m1, m2 = a + (b - a) * 0.382, a + (b - a) * 0.618
        if fit(m1)[0] <= fit(m2)[0]:
            b = m2
        else:
            a = m1
    log_bc = (a + b) / 2
    return math.exp(log_bc), math.exp(fit(log_bc)[1])


def critical_batch(rows: list[dict], by_rule: Mapping | None = None) -> CriticalBatch:
    """The sweep's critical batch: predicted from B_simple (all rules' rows), the same per rule,
    and fitted to each rule's steps to the target (``by_rule``: summaries per rule, from
    distbatch.measure.results.summarize_rules)."""
    by_rule = summarize_rules(rows) if by_rule is None else by_rule
    predicted, source, runs = predicted_critical_batch(rows)
    per_rule = {rule: predicted_critical_batch([r for r in rows if rule_of(r) == rule])
                for rule in by_rule}
    fitted = {}
    for rule, cells in by_rule.items():
        reached = {c.global_batch_size: c.steps_to_target.mean for c in cells
                   if c.steps_to_target.mean is not None and c.steps_to_target.n == c.ok > 0}
        fit = fit_critical_batch(reached)
        fitted[rule] = None if fit is None else (fit[0], fit[1], sorted(reached))
    return CriticalBatch(predicted, source, runs, per_rule, fitted)


def sweep_warmup_for(batch: int, base_batch_size: int, *, epochs: float | None = None,
                     steps: int | None = None, steps_per_epoch: int | None = None,
                     scaling: str = "linear") -> dict:
    """The default sweep's warmup for a run at ``batch`` (distbatch.measure.sweep_points): gradual
    over DEFAULT_WARMUP_EPOCHS (1 epoch) but at most DEFAULT_WARMUP_CAP (1/6) of the planned
    run; none when the lr is not scaled up (batch <= base batch) or under AdaScale, whose
    gain replaces warmup. `distbatch recommend` suggests it, so its command trains what the
    sweep measured."""
    if batch <= base_batch_size or scaling == "adascale":
        return {"warmup": "none"}
    if steps is not None:
        per_epoch = steps_per_epoch or steps
        return {"warmup": "gradual", "warmup_steps": max(1, min(
            int(math.floor(DEFAULT_WARMUP_EPOCHS * per_epoch + 0.5)),
            int(math.floor(steps * DEFAULT_WARMUP_CAP + 0.5))))}
    epochs = DEFAULT_EPOCHS if epochs is None else epochs
    return {"warmup": "gradual",
            "warmup_epochs": round(min(DEFAULT_WARMUP_EPOCHS, epochs * DEFAULT_WARMUP_CAP), 4)}
