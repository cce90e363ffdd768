"""The default sweep shows the answer (issue 29, item 3): one report for several scaling
rules (plot data with one line per rule, unreached points marked, the target named), one
recommendation chosen on quantities robust to timing noise, a critical-batch estimate that
does not depend on the rule, the sweep's real defaults in --help and in `recommend`, and
the sweep as a library call (distbatch.measure.sweep.run_sweep).

The synthetic rows copy the measured default sweep (docs/sweep.md): linear scaling + warmup
collapses at 512 and 1024, AdaScale holds ~97.9% and needs fewer steps as the batch grows;
the runs' FINAL B_simple medians are 152 (linear) and 1035 (AdaScale), as the issue found.
"""
from __future__ import annotations

import json
import random

import pytest

from distbatch.errors import ParameterError
from distbatch.measure.recommend import (choose_from_sweep, critical_batch, fit_critical_batch,
                                         predicted_critical_batch)
from distbatch.measure.report import PLOT_NAMES, build_report, plot_data
from distbatch.measure.results import (ROW_FIELDS, make_point_id, read_rows, summarize_rules,
                                       target_resolution, value_at_step)

BATCHES = (32, 64, 128, 256, 512, 1024)
# rule -> per batch: (final val acc, steps to 70% or None, samples/s, B_simple at the end)
MEASURED = {
    "linear": {32: (0.9797, 624, 13936, None), 64: (0.9762, 390, 23160, 4899),
               128: (0.9710, 234, 38260, 842), 256: (0.9538, 171, 50112, 152),
               512: (0.6683, None, 65664, 72), 1024: (0.4083, None, 74236, 11)},
    "adascale": {32: (0.9795, 624, 11038, None), 64: (0.9758, 390, 18317, 1678),
                 128: (0.9775, 273, 22793, 1725), 256: (0.9775, 209, 37323, 1035),
                 512: (0.9792, 171, 42235, 449), 1024: (0.9790, 144, 52057, 345)},
}
# B_simple at the target: identical at the base batch (the same training under every rule),
# rule-dependent above it (the runs follow different lr paths).
AT_TARGET = {"linear": {32: 33.0, 64: 35.0, 128: 32.0, 256: 21.0},
             "adascale": {32: 33.0, 64: 40.0, 128: 37.0, 256: 49.0, 512: 69.0, 1024: 72.0}}
# optimizer steps of each run (AdaScale's runs last the base batch's 3750 scale-invariant steps)
TOTAL = {"linear": {b: 6 * (20000 // b) for b in BATCHES},
         "adascale": {32: 3750, 64: 2528, 128: 1710, 256: 1201, 512: 883, 1024: 709}}


def row(rule, batch, seed=0, **changes):
    acc, steps, sps, end = MEASURED[rule][batch]
    total = TOTAL[rule][batch]
    every = max(1, 20000 // batch // 4)  # 4 evaluations per epoch of 20,000 examples
    history = [{"step": s, "epoch": s * batch / 20000, "val_accuracy": acc}
               for s in range(every, total + 1, every)]
    if steps is not None:  # the target is first seen at an evaluation: put one there
        history = sorted([h for h in history if h["step"] != steps]
                         + [{"step": steps, "epoch": 1.0, "val_accuracy": 0.7}], key=lambda h: h["step"])
    at = AT_TARGET[rule].get(batch)
    trajectory = [[1, 250.0]] + ([[steps, at]] if steps else []) + [[total, end or 900.0]]
    r = dict.fromkeys(ROW_FIELDS)
    r.update(point_id=make_point_id(batch, seed, rule), status="ok", global_batch_size=batch,
             per_replica_batch_size=batch, replicas=1, backend="single", seed=seed, steps=total,
             val_accuracy=acc, train_accuracy=acc + 0.003, generalization_gap=0.003,
             samples_per_sec=float(sps), steps_to_target=steps,
             time_to_target_s=None if steps is None else steps * batch / sps, diverged=False,
             b_simple=end, scaling_rule=rule, base_batch_size=32, target_accuracy=0.70,
             history=history, b_simple_trajectory=trajectory)
    r.update(changes)
    return r


def rows(seeds=(0,)):
    return [row(rule, b, s) for rule in MEASURED for b in BATCHES for s in seeds]


def cells(rs):
    return [c for cs in summarize_rules(rs).values() for c in cs]


# ------------------------------------------------------------------ plot data

def test_plot_data_has_one_line_per_rule_and_marks_unreached_points():
    rs = rows()
    by_rule = summarize_rules(rs)
    choice = choose_from_sweep(cells(rs))
    data = plot_data(by_rule, 0.70, critical_batch(rs, by_rule), choice)
    steps = data["steps"]
    assert list(steps["series"]) == ["linear", "adascale"]
    assert steps["series"]["linear"]["batch"] == [32, 64, 128, 256]
    assert steps["series"]["linear"]["steps"] == [624, 390, 234, 171]
    assert steps["series"]["adascale"]["batch"] == list(BATCHES)
    assert steps["series"]["adascale"]["steps"] == [624, 390, 273, 209, 171, 144]
    assert steps["not_reached"] == {"linear": [512, 1024], "adascale": []}
    assert steps["not_reached_label"] == "not reached within the budget"
    assert steps["title"] == "Optimizer steps to 70.00% validation accuracy"
    assert steps["recommended"] == {"label": "adascale", "batch": 1024, "steps": 144}
    assert steps["critical_batch"] == pytest.approx(33.0)
    # perfect scaling from batch 32's 624 steps: 624 * 32 / B
    assert steps["ideal"]["steps"] == pytest.approx([624 * 32 / b for b in BATCHES])
    acc = data["accuracy"]
    assert list(acc["series"]) == ["linear", "adascale"] and acc["target"] == pytest.approx(70.0)
    assert "70.00%" in acc["target_label"]
    assert acc["series"]["linear"]["val"] == pytest.approx([100 * MEASURED["linear"][b][0] for b in BATCHES])
    thr = data["throughput"]["series"]
    assert thr["adascale"]["sps"] == [MEASURED["adascale"][b][2] for b in BATCHES]
    assert data["throughput"]["not_reached"]["linear"] == [512, 1024]
    front = data["frontier"]["series"]
    assert front["linear"]["batch"] == list(BATCHES) and len(front["adascale"]["acc"]) == 6


def test_one_report_for_several_rules(tmp_path):
    path = build_report(tmp_path, rows())
    text = path.read_text()
    assert text.count("## Recommendation") == 1 and text.count("## Critical batch") == 1
    assert "**adascale at global batch 1024**: reaches 70.00% validation accuracy in 144 ± " in text
    for name in PLOT_NAMES.values():
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({name})" in text
    # the detail pages per rule carry no recommendation of their own
    for rule in MEASURED:
        sub = (tmp_path / "scaling" / rule / "report.md").read_text()
        assert "## Recommendation" not in sub and "Best batch" not in sub
        assert "](../../report.md)" in sub
    assert "| 512 | 66.83 | 234 | not reached | 97.92 | 883 | 171 |" in text


# ------------------------------------------------------------------ the recommendation

def test_recommendation_picks_the_known_answer():
    choice = choose_from_sweep(cells(rows()), tolerance_points=1.0)
    assert (choice.rule, choice.global_batch_size, choice.steps_to_target) == ("adascale", 1024, 144)
    # linear 256 ends 2.6 points below the best (97.97%): not eligible; 512/1024 never reached
    assert sorted((c.rule, c.global_batch_size) for c in choice.eligible) == sorted(
        [("linear", 32), ("linear", 64), ("linear", 128)] + [("adascale", b) for b in BATCHES])
    assert [(c.rule, c.global_batch_size) for c in choice.tied] == [("adascale", 1024)]
    assert choice.throughput_used is False
    # 0.5 points: linear 128 (97.10%) drops out; the pick stands
    assert choose_from_sweep(cells(rows()), tolerance_points=0.5).global_batch_size == 1024


@pytest.mark.parametrize("seed", range(5))
def test_recommendation_is_not_changed_by_time_noise(seed):
    """Time-to-target values of 1-4 s that vary as much between identical runs must not decide:
    scaling every time by 0.5-2x and every throughput by 0.8-1.25x leaves the pick."""
    rng = random.Random(seed)
    noisy = [dict(r, time_to_target_s=None if r["time_to_target_s"] is None
                  else r["time_to_target_s"] * rng.uniform(0.5, 2.0),
                  samples_per_sec=r["samples_per_sec"] * rng.uniform(0.8, 1.25)) for r in rows()]
    choice = choose_from_sweep(cells(noisy))
    assert (choice.rule, choice.global_batch_size) == ("adascale", 1024)


def three_seeds(steps_by_batch, sps_by_batch, sps_spread):
    """AdaScale rows at 512 and 1024 over 3 seeds with the given steps and throughputs."""
    out = []
    for b in (512, 1024):
        for s, d in enumerate((-1, 0, 1)):
            out.append(row("adascale", b, s, steps_to_target=steps_by_batch[b] + 10 * d,
                           samples_per_sec=sps_by_batch[b] * (1 + sps_spread * d)))
    return out


def test_indistinguishable_steps_pick_the_smallest_batch():
    # 160 ± 10 vs 150 ± 10 steps: within the combined uncertainty, so tied; time per step
    # 512/40000 vs 1024/50000 s differs by less than the 30% seed spread: the smaller batch
    choice = choose_from_sweep(cells(three_seeds({512: 160, 1024: 150}, {512: 40000, 1024: 50000}, 0.3)))
    assert [c.global_batch_size for c in choice.tied] == [512, 1024]
    assert (choice.global_batch_size, choice.throughput_used) == (512, False)
    # 200 vs 150 steps: no longer tied, the fewest steps win
    choice = choose_from_sweep(cells(three_seeds({512: 200, 1024: 150}, {512: 40000, 1024: 50000}, 0.3)))
    assert (choice.global_batch_size, [c.global_batch_size for c in choice.tied]) == (1024, [1024])


def test_throughput_decides_only_beyond_its_measured_spread():
    # tied steps; a step takes 1024/70000 = 14.6 ms at 1024 and 512/30000 = 17.1 ms at 512,
    # measured with a 1% spread: throughput separates them, and the quicker step wins
    fast = three_seeds({512: 160, 1024: 150}, {512: 30000, 1024: 70000}, 0.01)
    choice = choose_from_sweep(cells(fast))
    assert (choice.global_batch_size, choice.throughput_used) == (1024, True)
    # the same means with a 30% spread (std ~4-5 ms against a 2.4 ms difference): not
    # separable, the smaller batch
    loose = three_seeds({512: 160, 1024: 150}, {512: 30000, 1024: 70000}, 0.3)
    choice = choose_from_sweep(cells(loose))
    assert (choice.global_batch_size, choice.throughput_used) == (512, False)
    # one seed: the spread is unknown, throughput never decides
    one = [r for r in fast if r["seed"] == 1]
    assert choose_from_sweep(cells(one)).throughput_used is False


def test_cells_that_diverged_or_missed_the_target_in_one_seed_are_not_eligible():
    rs = rows(seeds=(0, 1))
    rs = [dict(r, steps_to_target=None) if (r["scaling_rule"], r["global_batch_size"], r["seed"])
          == ("adascale", 1024, 1) else r for r in rs]
    rs = [dict(r, status="diverged", diverged=True) if (r["scaling_rule"], r["global_batch_size"],
          r["seed"]) == ("adascale", 512, 0) else r for r in rs]
    choice = choose_from_sweep(cells(rs))
    assert ("adascale", 1024) not in [(c.rule, c.global_batch_size) for c in choice.eligible]
    assert ("adascale", 512) not in [(c.rule, c.global_batch_size) for c in choice.eligible]
    # fewest steps now: AdaScale 256 (209, evaluations every 19 steps); linear 128 (234, every
    # 39) is within the combined uncertainty, so the smaller batch is chosen
    assert sorted((c.rule, c.global_batch_size) for c in choice.tied) == [("adascale", 256), ("linear", 128)]
    assert (choice.rule, choice.global_batch_size) == ("linear", 128)


# ------------------------------------------------------------------ the critical batch

def test_critical_batch_from_b_simple_is_the_same_whichever_rules_rows_are_used():
    rs = rows()
    linear = [r for r in rs if r["scaling_rule"] == "linear"]
    adascale = [r for r in rs if r["scaling_rule"] == "adascale"]
    both, only_linear, only_adascale = (predicted_critical_batch(x) for x in (rs, linear, adascale))
    # the same estimate (the runs at the base batch: 2 of them, or 1 from one rule's rows)
    assert both[:2] == only_linear[:2] == only_adascale[:2] == (33.0, "base")
    assert (both[2], only_linear[2], only_adascale[2]) == (2, 1, 1)
    assert critical_batch(rs).per_rule == {"linear": only_linear, "adascale": only_adascale}
    # what the report used to do, the median of each run's final B_simple: 152 vs 1035
    strip = [{k: v for k, v in r.items() if k != "b_simple_trajectory"} for r in rs]
    ends = {rule: predicted_critical_batch([r for r in strip if r["scaling_rule"] == rule])
            for rule in MEASURED}
    assert ends == {"linear": (152, "end", 5), "adascale": (1035, "end", 5)}


def test_critical_batch_without_the_base_batch_pools_the_runs_at_the_target():
    rs = [r for r in rows() if r["global_batch_size"] > 32]
    value, source, runs = predicted_critical_batch(rs)
    # at-target values 35, 32, 21 (linear) and 40, 37, 49, 69, 72 (AdaScale): median 38.5
    assert (value, source, runs) == (pytest.approx(38.5), "reached", 8)


def test_fit_recovers_the_critical_batch_of_mccandlish_model():
    steps = {b: 100 * (1 + 150 / b) for b in BATCHES}
    b_crit, s_min = fit_critical_batch(steps)
    assert b_crit == pytest.approx(150, rel=1e-3) and s_min == pytest.approx(100, rel=1e-3)
    assert fit_critical_batch({32: 600, 64: 300}) is None  # two batches do not bracket it
    fitted = critical_batch(rows()).fitted
    assert fitted["linear"][2] == [32, 64, 128, 256] and fitted["adascale"][2] == list(BATCHES)
    assert 100 < fitted["linear"][0] < 250 and 80 < fitted["adascale"][0] < 200


def test_row_helpers():
    assert value_at_step([[0, 10.0], [100, 30.0], [300, 50.0]], 50) == pytest.approx(20.0)
    assert value_at_step([[0, 10.0], [100, 30.0]], 500) == pytest.approx(30.0)
    assert value_at_step([[10, 10.0]], 5) is None and value_at_step(None, 5) is None
    history = [{"step": 40}, {"step": 80}, {"step": 120}]
    assert target_resolution({"steps_to_target": 120, "history": history}) == 40
    assert target_resolution({"steps_to_target": 40, "history": history}) == 40
    assert target_resolution({"steps_to_target": 40, "history": [{"epoch": 1}]}) is None
    assert target_resolution({"steps_to_target": None, "history": history}) is None


# ------------------------------------------------------------------ real defaults

def test_sweep_help_and_parser_show_the_sweeps_real_defaults():
    from distbatch.cli import build_parser
    from distbatch.measure.sweep import DEFAULT_EPOCHS, SWEEP_DEFAULTS
    parser = build_parser("sweep")
    args = parser.parse_args(["sweep"])
    assert {k: getattr(args, k) for k in SWEEP_DEFAULTS} == SWEEP_DEFAULTS
    assert SWEEP_DEFAULTS["model"] == "convnet" and SWEEP_DEFAULTS["evals_per_epoch"] == 4
    sweep = parser._subparsers._group_actions[0].choices["sweep"]
    helps = {a.dest: " ".join(a.help.split()) for a in sweep._actions if a.help}
    assert helps["model"] == "named model (sweep default: convnet)"
    assert helps["evals_per_epoch"] == "validation passes per epoch (finer steps-to-target) (sweep default: 4)"
    assert helps["epochs"] == f"training length in epochs (sweep default: {DEFAULT_EPOCHS:g} epochs)"
    assert helps["target_accuracy"].endswith("(sweep default: 0.7)")
    text = " ".join(sweep.format_help().split())
    assert "default: mlp" not in text and "(default 1)" not in text.split("--evals-per-epoch")[1][:80]
    assert "lr tuned at --base-batch-size (default: 0.025)" in text
    assert "lr decay after warmup (default: cosine)" in text


def test_recommend_uses_the_sweeps_defaults():
    from distbatch.cli import build_parser
    from distbatch.cli.recommend import suggested_command, suggested_warmup
    from distbatch.measure.sweep import SWEEP_DEFAULTS
    rec = build_parser("recommend").parse_args(["recommend"])
    sweep = build_parser("sweep").parse_args(["sweep"])
    for name in ("model", "base_lr", "base_batch_size", "decay", "optimizer", "dataset"):
        assert getattr(rec, name) == getattr(sweep, name), name
    assert (rec.model, rec.base_lr, rec.decay) == (SWEEP_DEFAULTS["model"], 0.025, "cosine")
    # the suggested run is the sweep's: 6 epochs, 1 epoch of warmup when the lr is scaled up
    warmup = suggested_warmup(rec, 256, 20000)
    assert warmup == {"warmup": "gradual", "warmup_epochs": 1.0}
    assert suggested_warmup(rec, 32, 20000) == {"warmup": "none"}
    command = suggested_command(rec, 256, warmup)
    assert command[command.index("--epochs") + 1] == "6"
    assert command[command.index("--model") + 1] == "convnet"
    rec.epochs = 3.0
    assert suggested_warmup(rec, 256, 20000) == {"warmup": "gradual", "warmup_epochs": 0.5}  # 1/6 cap
    rec.epochs, rec.steps = None, 600
    assert suggested_warmup(rec, 256, 20000) == {"warmup": "gradual", "warmup_steps": 78}  # 1 epoch
    rec.scaling = "adascale"
    assert suggested_warmup(rec, 256, 20000) == {"warmup": "none"}


# ------------------------------------------------------------------ the library call

@pytest.mark.parametrize("kwargs, message", [
    ({"batch_sizes": []}, "batch_sizes must be a non-empty sequence of integers, got []"),
    ({"batch_sizes": [32, 0]}, "batch_sizes must be positive, got 0"),
    ({"batch_sizes": [32, 32]}, "batch_sizes has duplicates: [32, 32]"),
    ({"scalings": ["linear", "bogus"]}, "scalings must be one or more of"),
    ({"seeds": 0}, "seeds must be >= 1, got 0"),
    ({"seeds": [1, 1]}, "seeds must be a count >= 1 or distinct integers"),
])
def test_run_sweep_errors_name_its_parameters(tmp_path, kwargs, message):
    from distbatch.measure.sweep import run_sweep, sweep_config
    with pytest.raises(ParameterError) as e:
        run_sweep(sweep_config(out=str(tmp_path / "s")), **kwargs)
    assert str(e.value).startswith(message) and "--" not in str(e.value)
    assert not (tmp_path / "s").exists()


def test_sweep_config_is_the_default_sweep():
    from distbatch.measure.sweep import sweep_config
    c = sweep_config()
    assert (c.model, c.epochs, c.evals_per_epoch, c.target_accuracy, c.noise_scale, c.out) == \
        ("convnet", 6.0, 4, 0.70, True, "runs/sweep")
    r = c.recipe
    assert (r.base_lr, r.base_batch_size, r.decay, r.warmup_epochs, r.warmup_cap) == \
        (0.025, 32, "cosine", 1.0, 1 / 6)
    short = sweep_config(steps=40, warmup_steps=5)
    assert (short.epochs, short.steps, short.recipe.warmup_cap, short.recipe.warmup_steps) == \
        (None, 40, None, 5)


@pytest.mark.slow
def test_run_sweep_returns_the_rows_it_writes(tmp_path, dataset_cache):
    from distbatch.measure.sweep import run_sweep, sweep_config
    base = sweep_config(model="mlp", train_size=640, val_size=128, epochs=1.0, progress=False,
                        target_accuracy=0.15)
    out = tmp_path / "s"
    got = run_sweep(base, batch_sizes=[64, 32], scalings=["linear", "adascale"], out=out)
    assert [r["point_id"] for r in got] == [make_point_id(b, 0, rule) for rule in ("linear", "adascale")
                                            for b in (32, 64)]
    written = {r["point_id"]: r for r in read_rows(out)}
    assert got == [written[r["point_id"]] for r in got]
    for r in got:
        assert r["scaling_rule"] in ("linear", "adascale") and r["base_batch_size"] == 32
        assert isinstance(r["b_simple_trajectory"], list) and r["b_simple_trajectory"]
    text = (out / "report.md").read_text()
    assert text.count("## Recommendation") == 1 and (out / "steps_to_target.png").is_file() \
        or "no steps-to-target plot" in text
    config = json.loads((out / "config.json").read_text())
    assert (config["scaling"], config["batch_sizes"], config["model"]) == (["linear", "adascale"], [32, 64], "mlp")
    # a second call resumes: nothing is trained again, the same rows come back
    again = run_sweep(base.replace(resume=True), batch_sizes=[32, 64], scalings=["linear", "adascale"], out=out)
    assert again == got
