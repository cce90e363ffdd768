"""distbatch.Recipe: the recipe as a frozen dataclass, validated once, naming the field;
the CLI shows the same errors with the flag (distbatch.recipes.recipe)."""
from __future__ import annotations

import argparse
import dataclasses

import pytest

from distbatch import cli
from distbatch.errors import ParameterError, UsageError
from distbatch.recipes.recipe import Recipe
from distbatch.cli.recipe_flags import add_recipe_args, recipe_from_args


def parse(*flags):
    parser = argparse.ArgumentParser()
    add_recipe_args(parser)
    return parser.parse_args(list(flags))


def test_defaults_are_the_flags_defaults_and_the_issue_example_builds():
    assert recipe_from_args(parse()) == Recipe()
    import distbatch
    r = distbatch.Recipe(optimizer="momentum", base_lr=0.1, base_batch_size=256, scaling="linear",
                         warmup="gradual", warmup_epochs=5, decay="cosine")
    _, schedule, summary = r.build(global_batch_size=1024, steps_per_epoch=10, total_steps=100)
    assert summary["peak_lr"] == pytest.approx(0.4) and summary["warmup_steps"] == 50
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.base_lr = 1.0


@pytest.mark.parametrize("value", [[3, 6], (3.0, 6.0), "3,6", " 3, 6 "])
def test_decay_epochs_normalised_to_a_tuple_of_floats(value):
    assert Recipe(decay_epochs=value).decay_epochs == (3.0, 6.0)
    assert Recipe(decay_epochs="").decay_epochs is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(base_lr=-1), "base_lr must be > 0, got -1"),  # the issue's example
    (dict(base_lr=float("nan")), "base_lr must be > 0, got nan"),
    (dict(base_lr=float("inf")), "base_lr must be a finite number in (0, inf), got inf"),
    (dict(base_batch_size=0), "base_batch_size must be >= 1, got 0"),
    (dict(optimizer="sgdx"), "optimizer must be one of sgd, momentum, nesterov, adam, adamw, lamb, "
                             "lars, got 'sgdx'"),
    (dict(scaling="cubic"), "scaling must be one of linear, sqrt, adaptive-sqrt, none, adascale, "
                             "got 'cubic'"),
    (dict(warmup="slow"), "warmup must be one of gradual, constant, none, got 'slow'"),
    (dict(warmup_epochs=-1.0), "warmup_epochs must be a finite number in [0, inf), got -1.0"),
    (dict(warmup_steps=-2), "warmup_steps must be >= 0, got -2"),
    (dict(warmup_epochs=1, warmup_steps=2), "give warmup_epochs or warmup_steps, not both"),
    (dict(warmup_from="one"), "warmup_from must be one of base, zero, got 'one'"),
    (dict(decay="exp"), "decay must be one of constant, cosine, step, linear, got 'exp'"),
    (dict(decay_epochs="3,x"), "decay_epochs must be comma-separated numbers, got '3,x'"),
    (dict(decay_epochs=[]), "decay_epochs must list at least one epoch"),
    (dict(decay_epochs=[1, -2]), "decay_epochs must be finite epochs >= 0"),
    (dict(decay_factor=0), "decay_factor must be a finite number in (0, 1], got 0"),
    (dict(end_lr=-0.1), "end_lr must be a finite number in [0, inf), got -0.1"),
    (dict(decay_power=0), "decay_power must be a finite number in (0, inf), got 0"),
    (dict(momentum=1.0), "momentum must be a finite number in [0, 1), got 1.0"),
    (dict(weight_decay=-1e-4), "weight_decay must be a finite number in [0, inf), got -0.0001"),
    (dict(lars_eta=0), "lars_eta must be a finite number in (0, inf), got 0"),
    (dict(warmup_cap=1.5), "warmup_cap must be a finite number in (0, 1], got 1.5"),
])
def test_value_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError) as err:
        Recipe(**kwargs)
    assert str(err.value).startswith(message), str(err.value)
    assert "--" not in str(err.value)


@pytest.mark.parametrize("kwargs, name", [
    (dict(base_lr="0.1"), "base_lr"), (dict(base_batch_size=32.0), "base_batch_size"),
    (dict(base_batch_size=True), "base_batch_size"), (dict(momentum=None), "momentum"),
    (dict(exclude_bias_bn=1), "exclude_bias_bn"), (dict(decay_epochs=5), "decay_epochs"),
])
def test_type_errors_name_the_field(kwargs, name):
    with pytest.raises(TypeError, match=f"^{name} must be"):
        Recipe(**kwargs)


def test_build_errors_name_the_field():
    with pytest.raises(ParameterError, match="^warmup constant with warmup_from zero"):
        Recipe(warmup="constant", warmup_from="zero", warmup_steps=2).build(
            global_batch_size=64, steps_per_epoch=5, total_steps=10)
    with pytest.raises(ParameterError, match=r"^end_lr must be in \[0, peak lr"):
        Recipe(decay="cosine", end_lr=5.0).build(global_batch_size=64, steps_per_epoch=5, total_steps=10)
    with pytest.raises(ParameterError, match="^momentum_correction applies to optimizer momentum"):
        Recipe(optimizer="adam", momentum_correction=True).build(
            global_batch_size=64, steps_per_epoch=5, total_steps=10)
    with pytest.raises(ValueError, match="adascale"):
        Recipe(scaling="adascale").build(global_batch_size=64, steps_per_epoch=5, total_steps=10)


# Numbers of the pre-Recipe build_recipe(args) (commit 4f00896), for the same settings.
OLD = [
    (dict(warmup_cap=0.02),
     [],
     (1024, 10, 900), 'MomentumSGD',
     {'optimizer': 'momentum', 'base_lr': 0.05, 'base_batch_size': 32, 'scaling_rule': 'linear', 'peak_lr': 1.6, 'warmup': 'gradual', 'warmup_steps': 18, 'warmup_start_lr': 0.05, 'decay': 'step', 'decay_steps': [300, 600, 800], 'decay_factor': 0.1, 'end_lr': None, 'momentum': 0.9, 'momentum_correction': False, 'weight_decay': 0.0, 'exclude_bias_bn': True, 'lars_eta': None},
     [[0, 0.05000000074505806], [1, 0.13611111044883728], [128, 1.600000023841858], [300, 0.1599999964237213], [450, 0.1599999964237213], [899, 0.0015999999595806003], [900, 0.0015999999595806003]]),
    (dict(base_lr=0.1, base_batch_size=256, warmup_epochs=5, decay="cosine"),
     ["--base-lr", "0.1", "--base-batch-size", "256", "--warmup-epochs", "5", "--decay", "cosine"],
     (8192, 156, 14040), 'MomentumSGD',
     {'optimizer': 'momentum', 'base_lr': 0.1, 'base_batch_size': 256, 'scaling_rule': 'linear', 'peak_lr': 3.2, 'warmup': 'gradual', 'warmup_steps': 780, 'warmup_start_lr': 0.1, 'decay': 'cosine', 'decay_steps': [], 'decay_factor': None, 'end_lr': 0.0, 'momentum': 0.9, 'momentum_correction': False, 'weight_decay': 0.0, 'exclude_bias_bn': True, 'lars_eta': None},
     [[0, 0.10000000149011612], [1, 0.10394319891929626], [2005, 3.041661024093628], [4680, 2.4000000953674316], [7020, 1.5999999046325684], [14039, 0.0], [14040, 0.0]]),
    (dict(optimizer="lars", decay_epochs="3,6", warmup_from="zero", warmup_epochs=1, weight_decay=5e-4, lars_eta=0.02),
     ["--optimizer", "lars", "--decay-epochs", "3,6", "--warmup-from", "zero", "--warmup-epochs", "1", "--weight-decay", "5e-4", "--lars-eta", "0.02"],
     (256, 4, 40), 'LARS',
     {'optimizer': 'lars', 'base_lr': 0.05, 'base_batch_size': 32, 'scaling_rule': 'linear', 'peak_lr': 0.4, 'warmup': 'gradual', 'warmup_steps': 4, 'warmup_start_lr': 0.0, 'decay': 'step', 'decay_steps': [12, 24], 'decay_factor': 0.1, 'end_lr': None, 'momentum': 0.9, 'momentum_correction': False, 'weight_decay': 0.0005, 'exclude_bias_bn': True, 'lars_eta': 0.02},
     [[0, 0.0], [1, 0.10000000149011612], [5, 0.4000000059604645], [13, 0.03999999910593033], [20, 0.03999999910593033], [39, 0.004000000189989805], [40, 0.004000000189989805]]),
    (dict(optimizer="adamw", scaling="sqrt", warmup="constant", warmup_steps=7, decay="linear", end_lr=0.001, decay_power=2.0, weight_decay=0.01, exclude_bias_bn=False),
     ["--optimizer", "adamw", "--scaling", "sqrt", "--warmup", "constant", "--warmup-steps", "7", "--decay", "linear", "--end-lr", "0.001", "--decay-power", "2", "--weight-decay", "0.01", "--no-exclude-bias-bn"],
     (512, 9, 90), 'AdamW',
     {'optimizer': 'adamw', 'base_lr': 0.05, 'base_batch_size': 32, 'scaling_rule': 'sqrt', 'peak_lr': 0.2, 'warmup': 'constant', 'warmup_steps': 7, 'warmup_start_lr': 0.05, 'decay': 'linear', 'decay_steps': [], 'decay_factor': None, 'end_lr': 0.001, 'momentum': None, 'momentum_correction': False, 'weight_decay': 0.01, 'exclude_bias_bn': False, 'lars_eta': None},
     [[0, 0.05000000074505806], [1, 0.05000000074505806], [12, 0.15047112107276917], [30, 0.08944443613290787], [45, 0.0507499985396862], [89, 0.001024568104185164], [90, 0.0010000000474974513]]),
    (dict(optimizer="nesterov", momentum_correction=True, scaling="none", decay_factor=0.5, momentum=0.8),
     ["--optimizer", "nesterov", "--momentum-correction", "--scaling", "none", "--decay-factor", "0.5", "--momentum", "0.8"],
     (64, 5, 50), 'MomentumSGD',
     {'optimizer': 'nesterov', 'base_lr': 0.05, 'base_batch_size': 32, 'scaling_rule': 'none', 'peak_lr': 0.05, 'warmup': 'gradual', 'warmup_steps': 3, 'warmup_start_lr': 0.05, 'decay': 'step', 'decay_steps': [17, 33, 44], 'decay_factor': 0.5, 'end_lr': None, 'momentum': 0.8, 'momentum_correction': True, 'weight_decay': 0.0, 'exclude_bias_bn': True, 'lars_eta': None},
     [[0, 0.05000000074505806], [1, 0.05000000074505806], [7, 0.05000000074505806], [16, 0.05000000074505806], [25, 0.02500000037252903], [49, 0.0062500000931322575], [50, 0.0062500000931322575]]),
]


@pytest.mark.parametrize("kwargs, flags, run, optimizer, summary, lrs", OLD)
def test_build_equals_the_old_build_recipe(kwargs, flags, run, optimizer, summary, lrs):
    g, spe, total = run
    args = parse(*flags)
    if "warmup_cap" in kwargs:
        args.warmup_cap = kwargs["warmup_cap"]
    assert recipe_from_args(args) == Recipe(**kwargs)
    opt, schedule, got = Recipe(**kwargs).build(global_batch_size=g, steps_per_epoch=spe, total_steps=total)
    assert type(opt).__name__ == optimizer
    # Keys added since (issue #29): the betas and epsilon of adam/adamw/lamb (Keras's defaults
    # without adaptive-sqrt), adaptive-sqrt's caps, AdaScale's lr exponent; null otherwise.
    added = {"beta_1", "beta_2", "epsilon", "scaling_capped", "adascale_lr_exponent"}
    assert got.keys() == summary.keys() | added
    adaptive = kwargs.get("optimizer") in ("adam", "adamw", "lamb")
    assert [got[k] for k in ("beta_1", "beta_2", "epsilon")] == ([0.9, 0.999, 1e-7] if adaptive else [None] * 3)
    assert got["scaling_capped"] is None and got["adascale_lr_exponent"] is None
    for key, value in summary.items():
        assert got[key] == (pytest.approx(value) if isinstance(value, float) else value), key
    for step, lr in lrs:
        assert float(schedule(step)) == pytest.approx(lr, rel=1e-6, abs=1e-9), step


@pytest.mark.parametrize("flags, message", [
    (["--base-lr", "-1"], "--base-lr must be > 0, got -1.0"),
    (["--decay-epochs", "3,x"], "--decay-epochs must be comma-separated numbers, got '3,x'"),
    (["--warmup-from", "zero", "--warmup", "constant", "--warmup-steps", "2"],
     "--warmup constant with --warmup-from zero would hold lr 0; use --warmup-from base"),
    (["--decay", "cosine", "--end-lr", "50"], "--end-lr must be in [0, peak lr"),
    (["--optimizer", "adam", "--weight-decay", "0.1"],
     "--optimizer adam takes no weight decay (Keras's is decoupled, i.e. AdamW), got "
     "--weight-decay 0.1; use --optimizer adamw"),
])
def test_cli_names_the_flag(tmp_path, capsys, flags, message):
    argv = ["train", "--dataset", "mnist1d", "--train-size", "64", "--val-size", "32",
            "--global-batch-size", "16", "--steps", "2", "--backend", "single",
            "--out", str(tmp_path / "out"), *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"distbatch: error: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_recipe_from_args_names_the_flag():
    with pytest.raises(UsageError, match=r"^--momentum must be a finite number in \[0, 1\), got 1.5"):
        recipe_from_args(parse("--momentum", "1.5"))
