"""TrainConfig: one training job as a frozen, validated object.

The CLI builds it once from its flags (distbatch.cli.train.config_from_args);
the sweep, recommend and the benchmarks derive one per run with
``dataclasses.replace``. Every field is checked in ``__post_init__`` with errors
that name the FIELD ("epochs must be > 0, got -1"); the CLI shows the same error
with the field's flag. Checks that need the backend or the data
(batch arithmetic) happen later, in distbatch.training.job.plan_run.

``config.json`` of a run is :meth:`TrainConfig.as_flags` plus derived values:
one key per flag, named as the flag, as it always was (a resumed run compares it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from distbatch.backends.cluster import resolve_cluster_timeout
from distbatch.backends.environment import CollectiveOptions
from distbatch.choices import BACKENDS, MODELS
from distbatch.errors import require_param
from distbatch.recipes.recipe import Recipe, _choice, _in_range, _integer
from distbatch.training.batch_schedule import parse_batch_schedule

DEFAULT_EPOCHS = 10.0
MAX_EPOCHS = 1e6  # beyond this a run would not end (and inf/1e30 overflow the step count)
MIXED_PRECISION = ("off", "float16", "bfloat16")
EARLY_STOPPING_METRICS = ("val_loss", "val_accuracy")
# Fields a sweep point sets; config.json of a plain run has them only when not at the default.
_POINT_ONLY = {"tensorboard_dir": None, "progress": True, "stop_at_target": False}



@dataclass(frozen=True)
class TrainConfig:
    """Everything one `distbatch train` run is given (one field per flag of `distbatch train`).

    ``epochs`` and ``steps`` exclude each other; with neither the run is
    ``DEFAULT_EPOCHS`` long (:attr:`epochs_or_default`). ``global_batch_size`` is an
    integer, "auto" (chosen by goodput, with ``max_global_batch_size`` and
    ``recipe.scaling == "adascale"``), "ramp" (grown with the noise scale up to
    ``max_global_batch_size``, distbatch.training.batch_ramp) or None with a
    ``batch_size_schedule``.
    """
    out: str | None = None
    recipe: Recipe = field(default_factory=Recipe)
    backend: str = "auto"
    cpu_replicas: int | None = None
    dataset: str = "mnist1d"
    train_size: int | None = None
    val_size: int | None = None
    num_classes: int | None = None
    model: str = "mlp"
    global_batch_size: int | str | None = None
    max_global_batch_size: int | None = None
    batch_size_schedule: str | None = None
    epochs: float | None = None
    steps: int | None = None
    seed: int = 0
    data_seed: int = 0
    accumulation_steps: int = 1
    mixed_precision: str = "off"
    sync_batchnorm: bool = False
    deterministic: bool = False
    noise_scale: bool = False
    target_accuracy: float | None = None
    evals_per_epoch: int = 1
    early_stopping_metric: str | None = None
    early_stopping_patience: int = 5
    min_delta: float = 0.0
    checkpoint_every: int = 0
    checkpoint_every_seconds: float | None = None
    elastic_commit_every: int | None = None  # Horovod Elastic: steps between commits (docs/elastic.md)
    steps_per_execution: int | str = "auto"
    jit_compile: str = "off"
    cluster_timeout: float | None = None
    bucket_mb: float | str = "auto"
    grad_compression: str = "none"
    mwms_implementation: str = "auto"
    bytes_per_pack: int = 0
    collective_timeout: float | None = None
    stall_timeout: float | None = None   # horovod: bound on a wait for the other ranks
    resume: bool = False
    overwrite: bool = False
    tensorboard_dir: str | None = None   # default: OUT/tensorboard
    progress: bool = True                # False: a sweep's points stay quiet
    stop_at_target: bool = False

    def __post_init__(self):
        if not isinstance(self.recipe, Recipe):
            raise TypeError(f"recipe must be a distbatch.Recipe, got {type(self.recipe).__name__}")
        _choice("backend", self.backend, BACKENDS)
        _choice("model", self.model, MODELS)
        self._check_batch()
        self._check_length()
        _integer("accumulation_steps", self.accumulation_steps, 1)
        for name in ("seed", "data_seed"):
            value = getattr(self, name)
            _integer(name, value, -math.inf)
            require_param(0 <= value < 2**32, f"{{{name}}} must be an integer in [0, 2**32), got {value}",
                          name)
        for name in ("train_size", "val_size"):
            value = getattr(self, name)
            if value is not None:
                _integer(name, value, -math.inf)
                require_param(value >= 1, f"{{{name}}} must be >= 1 examples, got {value}", name)
        require_param(math.isfinite(self.min_delta) and self.min_delta >= 0,
                      f"{{min_delta}} must be a finite number >= 0, got {self.min_delta}", "min_delta")
        _integer("evals_per_epoch", self.evals_per_epoch, 1)
        _integer("early_stopping_patience", self.early_stopping_patience, 1)
        _integer("checkpoint_every", self.checkpoint_every, 0)
        s = self.checkpoint_every_seconds
        require_param(s is None or (math.isfinite(s) and s >= 0),
                      f"{{checkpoint_every_seconds}} must be a finite number of seconds >= 0 (0: off), "
                      f"got {s}", "checkpoint_every_seconds")
        if self.elastic_commit_every is not None:  # a commit is a checkpoint: one step cadence
            _integer("elastic_commit_every", self.elastic_commit_every, 1)
            require_param(self.checkpoint_every in (0, self.elastic_commit_every),
                          f"{{elastic_commit_every}} {self.elastic_commit_every} and {{checkpoint_every}} "
                          f"{self.checkpoint_every} both set the steps between checkpoints (an elastic "
                          "commit is a checkpoint); give one of them",
                          "elastic_commit_every", "checkpoint_every")
        t = self.target_accuracy
        require_param(t is None or 0 < t <= 1, f"{{target_accuracy}} must be in (0, 1], got {t}",
                      "target_accuracy")
        if self.cpu_replicas is not None:
            _integer("cpu_replicas", self.cpu_replicas, 1)
        require_param(self.num_classes is None or self.num_classes >= 2,
                      f"{{num_classes}} must be >= 2, got {self.num_classes}", "num_classes")
        require_param(not (self.resume and self.overwrite), "{resume} and {overwrite} exclude each other",
                      "resume", "overwrite")
        require_param(self.mixed_precision in MIXED_PRECISION,
                      f"{{mixed_precision}} must be one of {', '.join(MIXED_PRECISION)}, got "
                      f"{self.mixed_precision!r}", "mixed_precision")
        require_param(self.early_stopping_metric in (None, *EARLY_STOPPING_METRICS),
                      f"{{early_stopping_metric}} must be one of {', '.join(EARLY_STOPPING_METRICS)}, "
                      f"got {self.early_stopping_metric!r}", "early_stopping_metric")
        require_param(self.jit_compile in ("off", "on"),
                      f"{{jit_compile}} must be 'off' or 'on', got {self.jit_compile!r}", "jit_compile")
        spe = self.steps_per_execution
        require_param(spe == "auto" or (isinstance(spe, int) and not isinstance(spe, bool) and spe >= 1),
                      f"{{steps_per_execution}} must be a whole number >= 1 or 'auto', got {spe!r}",
                      "steps_per_execution")
        b = self.bucket_mb
        require_param(b == "auto" or (isinstance(b, (int, float)) and not isinstance(b, bool)
                                      and math.isfinite(b) and b >= 0),
                      f"{{bucket_mb}} must be a finite number >= 0 (0: one all-reduce) or 'auto', "
                      f"got {b!r}", "bucket_mb")
        self.collective_options()  # --bytes-per-pack, --collective-timeout
        resolve_cluster_timeout(self.cluster_timeout)
        from distbatch.backends.arrivals import resolve_timeout
        resolve_timeout(self.stall_timeout, env={})

    def _check_batch(self) -> None:
        g, r = self.global_batch_size, self.recipe
        m = self.max_global_batch_size
        if m is not None and g not in ("auto", "ramp"):  # else accepted and silently ignored
            got = "no {global_batch_size}" if g is None else f"{{global_batch_size}} {g}"
            require_param(False, f"{{max_global_batch_size}} {m} only applies to {{global_batch_size}} "
                                 f"auto or ramp, got {got}", "max_global_batch_size", "global_batch_size")
        if g in ("auto", "ramp"):
            require_param(m is not None, f"{{global_batch_size}} {g} needs {{max_global_batch_size}} "
                                         "(the largest batch it may choose)", "global_batch_size",
                          "max_global_batch_size")
            _integer("max_global_batch_size", m, -math.inf)
            require_param(m >= r.base_batch_size, f"{{max_global_batch_size}} must be >= "
                          f"{{base_batch_size}} ({r.base_batch_size}), got {m}", "max_global_batch_size",
                          "base_batch_size")
            require_param(g == "ramp" or r.scaling == "adascale", f"{{global_batch_size}} auto follows "
                          f"AdaScale's gain; add {{scaling}} adascale (got {{scaling}} {r.scaling})",
                          "global_batch_size", "scaling")
            for name, bad in (("batch_size_schedule", self.batch_size_schedule),
                              ("early_stopping_metric", self.early_stopping_metric),
                              ("resume", self.resume)):
                require_param(not bad, f"{{global_batch_size}} {g} does not combine with {{{name}}} yet",
                              "global_batch_size", name)
            require_param(g == "auto" or self.steps is None, "{global_batch_size} ramp changes the "
                          f"batch at whole epochs: give the length in {{epochs}}, got {{steps}} "
                          f"{self.steps}", "global_batch_size", "epochs", "steps")
        elif g is not None:
            _integer("global_batch_size", g, -math.inf)
            require_param(g >= 1, f"{{global_batch_size}} must be a positive integer, got {g}",
                          "global_batch_size")
        elif not self.batch_size_schedule:
            require_param(False, "{global_batch_size} is required (or give {batch_size_schedule})",
                          "global_batch_size", "batch_size_schedule")
        if self.batch_size_schedule:
            last = parse_batch_schedule(self.batch_size_schedule)[-1][0]
            require_param(self.steps is None, f"{{batch_size_schedule}} needs the length in {{epochs}} "
                          f"(the batch changes at epochs), got {{steps}} {self.steps}",
                          "batch_size_schedule", "epochs", "steps")
            if self.epochs is not None:
                require_param(last < self.epochs, f"{{batch_size_schedule}} point at epoch {last} is not "
                              f"before the end of training ({{epochs}} {self.epochs:g})",
                              "batch_size_schedule", "epochs")

    def _check_length(self) -> None:
        e, s = self.epochs, self.steps
        require_param(e is None or s is None, f"give {{epochs}} or {{steps}}, not both (got {e} and {s})",
                      "epochs", "steps")
        if e is not None:
            require_param(e > 0, f"{{epochs}} must be > 0, got {e}", "epochs")
            require_param(e <= MAX_EPOCHS, f"{{epochs}} must be at most {MAX_EPOCHS:g}, got {e}", "epochs")
        if s is not None:
            require_param(s >= 1, f"{{steps}} must be >= 1, got {s}", "steps")

    @property
    def epochs_or_default(self) -> float | None:
        """The run's length in epochs: ``epochs``, or DEFAULT_EPOCHS when no length is given."""
        return DEFAULT_EPOCHS if self.epochs is None and self.steps is None else self.epochs

    def collective_options(self):
        """The MultiWorkerMirroredStrategy options (validated; UsageError)."""
        return CollectiveOptions(implementation=self.mwms_implementation,
                                 bytes_per_pack=self.bytes_per_pack,
                                 timeout_seconds=self.collective_timeout)

    def replace(self, **changes) -> "TrainConfig":
        """A copy with ``changes`` (fields of the config or of its recipe), validated again."""
        recipe_names = {f.name for f in dataclasses.fields(Recipe)}
        recipe_changes = {k: changes.pop(k) for k in list(changes) if k in recipe_names}
        if recipe_changes:
            changes["recipe"] = dataclasses.replace(changes.get("recipe", self.recipe),
                                                    **recipe_changes)
        return dataclasses.replace(self, **changes)

    def as_flags(self) -> dict:
        """One entry per flag, named as the flag (config.json's keys), the recipe's included.

        The length is the resolved one (epochs DEFAULT_EPOCHS when none was given);
        ``decay_epochs`` is written as the flag takes it ("3,6"); fields only a sweep
        point sets are left out at their defaults.
        """
        flags = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "recipe"}
        flags["epochs"] = self.epochs_or_default
        for name, default in _POINT_ONLY.items():
            if flags[name] == default:
                del flags[name]
        recipe = dataclasses.asdict(self.recipe)
        if recipe["warmup_cap"] is None:
            del recipe["warmup_cap"]
        if recipe["decay_epochs"] is not None:
            recipe["decay_epochs"] = ",".join(f"{e:g}" for e in recipe["decay_epochs"])
        return {**flags, **recipe}
