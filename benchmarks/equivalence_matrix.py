"""The equivalence matrix: R replicas against one device at the same global batch, per layer
family, optimizer and feature (docs/correctness.md, tests/test_equivalence_matrix.py).

    python benchmarks/equivalence_matrix.py run --out DIR [--steps K] [--rows a,b] [--backends ...]
    python benchmarks/equivalence_matrix.py table --out DIR

`run` trains every row for K steps at global batch 32 through distbatch.fit on one device,
mirrored (2 logical CPUs), multiworker (2 local processes under `distbatch launch
multiworker`) and Horovod (`horovodrun --gloo -np 2`), each backend in one process (per rank)
that runs all rows; every rank writes each row's final weights and validation metrics.
`table` prints, per row and backend, the max abs weight difference from one device, the
largest validation-metric difference, and whether the ranks ended identical.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

BACKENDS = ("single", "mirrored", "multiworker", "horovod")
GLOBAL_BATCH = 32


@dataclass(frozen=True)
class Row:
    name: str
    what: str
    tolerance: float | None     # max abs weight difference allowed; None: not equal (why says)
    why: str
    model: str = "dense"        # dense | conv | bn | dropout | embedding | regularized | two_outputs
    optimizer: str = "momentum"
    fit: dict = field(default_factory=dict)
    precision: str = "float32"


ROWS = [
    Row("dense-sgd", "Dense, SGD", 1e-5, "same sums in another order (float32)", optimizer="sgd"),
    Row("dense-momentum", "Dense, SGD + momentum", 1e-5, "same sums in another order"),
    Row("dense-adam", "Dense, Adam", 1e-5, "same sums in another order", optimizer="adam"),
    Row("dense-adamw", "Dense, AdamW", 1e-5, "same sums in another order", optimizer="adamw"),
    Row("dense-lamb", "Dense, LAMB", 1e-5, "same sums in another order", optimizer="lamb"),
    Row("dense-lars", "Dense, LARS", 1e-5, "same sums in another order", optimizer="lars"),
    Row("conv-momentum", "Conv1D + pooling, SGD + momentum", 1e-5, "same sums in another order",
        model="conv"),
    Row("batchnorm-local", "BatchNormalization, per-replica moments (default)", None,
        "each replica normalises its own B/R examples: another model than one device at B "
        "(use sync_batchnorm)", model="bn"),
    Row("batchnorm-sync", "BatchNormalization, sync_batchnorm=True", 1e-5,
        "moments of the global batch: E[x^2] - E[x]^2 over all replicas vs one device's "
        "two-pass moments (float32)", model="bn", fit={"sync_batchnorm": True}),
    Row("dropout", "Dropout(0.3)", None, "each replica draws its own, independent masks for its "
        "slice; one device draws other masks for the same examples: equal in distribution only",
        model="dropout"),
    Row("embedding", "Embedding (sparse gradients) + Dense", 1e-5, "same sums in another order",
        model="embedding"),
    Row("regularizers", "kernel L2 + activity L1 regularizers", 1e-5,
        "model.losses counted once per global batch", model="regularized"),
    Row("bfloat16", "mixed_bfloat16 policy", 2e-3, "bfloat16 activations (8-bit mantissa): the "
        "per-replica loss sums round differently from one device's", precision="mixed_bfloat16"),
    Row("float16", "mixed_float16 + LossScaleOptimizer", 5e-4, "float16 activations (11-bit "
        "mantissa), as bfloat16", precision="mixed_float16"),
    Row("two-outputs", "two outputs, a loss per output, loss_weights", 1e-5, "same sums in another order",
        model="two_outputs"),
    Row("sample-weights", "sample weights", 1e-5, "same sums in another order",
        fit={"sample_weights": True}),
    Row("stateful-metrics", "AUC, Precision, Recall, IoU (confusion matrix) on 193 validation examples", 1e-5,
        "metric states summed exactly across replicas; the last batch (1 example) is shorter "
        "than the replica count: padded and masked", fit={"stateful_metrics": True}),
    Row("accumulation", "gradient accumulation (2 micro-batches)", 1e-5,
        "same sums in another order", fit={"accumulation_steps": 2}),
    Row("restored", "a model restored from model.keras, trained on", 1e-5,
        "same sums in another order", fit={"restored": True}),
]


def _data(row: Row, np):
    rng = np.random.default_rng(0)
    n_train, n_val = 512, 193
    if row.model == "embedding":
        x = rng.integers(0, 50, size=(n_train + n_val, 6))
        y = (x[:, 0] % 2).astype("int64")
    else:
        x = rng.normal(size=(n_train + n_val, 12)).astype("float32")
        y = (x[:, 0] + x[:, 1] > 0).astype("int64")
    if row.model == "two_outputs":
        y = {"cls": y, "reg": x[:, :1] * 0.5}
        cut = lambda d, a, b: {k: v[a:b] for k, v in d.items()}  # noqa: E731
        return (x[:n_train], cut(y, 0, n_train)), (x[n_train:], cut(y, n_train, None))
    train = (x[:n_train], y[:n_train])
    if row.fit.get("sample_weights"):
        train = (*train, rng.uniform(0.1, 2.0, size=n_train).astype("float32"))
    return train, (x[n_train:], y[n_train:])


def _model(row: Row, keras):
    L = keras.layers
    if row.model == "embedding":
        return keras.Sequential([keras.Input((6,), dtype="int32"), L.Embedding(50, 8), L.Flatten(), L.Dense(2)])
    if row.model == "two_outputs":
        inp = keras.Input((12,))
        h = L.Dense(16, activation="tanh")(inp)
        return keras.Model(inp, {"cls": L.Dense(2, name="cls")(h), "reg": L.Dense(1, name="reg")(h)})
    body = {
        "dense": [L.Dense(16, activation="tanh")],
        "conv": [L.Reshape((12, 1)), L.Conv1D(4, 3, activation="relu"), L.MaxPooling1D(2), L.Flatten()],
        "bn": [L.Dense(16), L.BatchNormalization(), L.ReLU()],
        "dropout": [L.Dense(16, activation="relu"), L.Dropout(0.3)],
        "regularized": [L.Dense(16, activation="tanh", kernel_regularizer=keras.regularizers.L2(1e-2),
                                activity_regularizer=keras.regularizers.L1(1e-3))],
    }[row.model]
    return keras.Sequential([keras.Input((12,)), *body, L.Dense(2, dtype="float32")])


def _optimizer(row: Row, keras):
    import distbatch
    opt = {"sgd": lambda: keras.optimizers.SGD(0.1),
           "momentum": lambda: keras.optimizers.SGD(0.05, momentum=0.9),
           "adam": lambda: keras.optimizers.Adam(1e-2),
           "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=1e-2),
           "lamb": lambda: keras.optimizers.Lamb(1e-2),
           "lars": lambda: distbatch.LARS(0.5, momentum=0.9)}[row.optimizer]()
    return keras.optimizers.LossScaleOptimizer(opt) if row.precision == "mixed_float16" else opt


def worker(backend_name: str, out: str, steps: int, rows: list[str]) -> None:
    """Every row on this process's backend; writes <out>/<backend>/<row>-rank<r>.{npz,json}."""
    import distbatch
    backend, _ = distbatch.create_backend(backend_name, cpu_replicas=2 if backend_name == "mirrored" else None)
    import keras
    import numpy as np
    rank = backend.worker_index
    target = Path(out) / backend_name
    target.mkdir(parents=True, exist_ok=True)
    for row in (r for r in ROWS if r.name in rows):
        keras.mixed_precision.set_global_policy(row.precision)
        train, val = _data(row, np)
        extra = {k: v for k, v in row.fit.items() if k in ("sync_batchnorm", "accumulation_steps")}
        if row.fit.get("stateful_metrics"):
            extra["metrics"] = [keras.metrics.AUC(from_logits=True, name="auc"),
                                keras.metrics.Precision(thresholds=0.0, name="precision"),
                                keras.metrics.Recall(thresholds=0.0, name="recall"),
                                keras.metrics.BinaryIoU(target_class_ids=[0, 1], threshold=0.0,
                                                        name="iou")]
            extra["loss"] = keras.losses.BinaryCrossentropy(from_logits=True)
            train = (train[0], train[1][:, None].astype("float32"))
            val = (val[0], val[1][:, None].astype("float32"))
        if row.model == "two_outputs":
            extra["loss"] = {"cls": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             "reg": "mse"}
            extra["metrics"] = {"cls": ["accuracy"], "reg": ["mae"]}
            extra["loss_weights"] = {"cls": 1.0, "reg": 0.5}
        model_fn = lambda: _model(row, keras)  # noqa: E731
        if row.fit.get("stateful_metrics"):
            model_fn = lambda: keras.Sequential([keras.Input((12,)), keras.layers.Dense(16, activation="tanh"),  # noqa: E731
                                                 keras.layers.Dense(1)])
        if row.fit.get("restored"):
            path = target / f"restored-start-rank{rank}.keras"
            keras.utils.set_random_seed(7)
            _model(row, keras).save(path)
            model_fn = lambda: keras.models.load_model(path)  # noqa: E731
        result = distbatch.fit(model_fn=model_fn, optimizer_fn=lambda: _optimizer(row, keras),
                               data=train, validation_data=val, global_batch_size=GLOBAL_BATCH,
                               steps=steps, seed=3, backend=backend, verbose=False,
                               shuffle_buffer=512, **extra)
        np.savez(target / f"{row.name}-rank{rank}.npz", *result.model.get_weights())
        with open(target / f"{row.name}-rank{rank}.json", "w") as f:
            json.dump({k: v for k, v in result.metrics.items()
                       if k.startswith("val_") and isinstance(v, float)}, f)
    keras.mixed_precision.set_global_policy("float32")


def run(out: str, steps: int, rows: list[str], backends: list[str]) -> None:
    """One process per backend (two per multi-process backend), one after the other."""
    here, py = str(Path(__file__).resolve()), sys.executable
    bin_dir = Path(py).parent
    env = dict(os.environ, PYTHONPATH=str(Path(here).parents[1]))
    env.pop("TF_CONFIG", None)
    tail = ["worker", "--backend", "{b}", "--out", out, "--steps", str(steps), "--rows", ",".join(rows)]
    for b in backends:
        args = [a.replace("{b}", b) for a in tail]
        cmd = {"single": [py, here, *args], "mirrored": [py, here, *args],
               "multiworker": [str(bin_dir / "distbatch"), "launch", "multiworker", "--workers", "2",
                               "--", py, here, *args],
               "horovod": [str(bin_dir / "horovodrun"), "-np", "2", "-H", "localhost:2", "--gloo",
                           py, here, *args]}[b]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise SystemExit(f"{b} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def compare(out: str, rows: list[str] | None = None, backends=BACKENDS[1:]) -> dict:
    """{row: {backend: {"weights": max abs diff, "metrics": max abs diff, "ranks_equal": bool}}}."""
    import numpy as np
    result = {}
    for row in ROWS:
        if rows is not None and row.name not in rows:
            continue
        ref_dir = Path(out) / "single"
        if not (ref_dir / f"{row.name}-rank0.npz").exists():  # a run of some rows only
            continue
        ref = np.load(ref_dir / f"{row.name}-rank0.npz")
        ref_m = json.loads((ref_dir / f"{row.name}-rank0.json").read_text())
        result[row.name] = {}
        for b in backends:
            files = sorted((Path(out) / b).glob(f"{row.name}-rank*.npz"))
            if not files:
                continue
            ranks = [np.load(f) for f in files]
            mets = json.loads((Path(out) / b / f"{row.name}-rank0.json").read_text())
            result[row.name][b] = {
                "weights": max(float(np.max(np.abs(ranks[0][k] - ref[k]))) for k in ref.files),
                "metrics": max([abs(mets[k] - ref_m[k]) for k in ref_m] or [0.0]),
                "ranks_equal": all(np.array_equal(r[k], ranks[0][k]) for r in ranks for k in ref.files),
            }
    return result


def table(out: str, backends=BACKENDS[1:]) -> str:
    found = compare(out, backends=backends)
    lines = ["| row | " + " | ".join(f"{b}: weights / val metrics" for b in backends)
             + " | tolerance | why |", "|---|" + "---:|" * len(backends) + "---:|---|"]
    for row in ROWS:
        if row.name not in found:
            continue
        cells = []
        for b in backends:
            c = found[row.name].get(b)
            cells.append("-" if c is None else
                         f"{c['weights']:.1e} / {c['metrics']:.1e}" + ("" if c["ranks_equal"] else " (ranks differ)"))
        tol = "not equal" if row.tolerance is None else f"{row.tolerance:g}"
        lines.append(f"| {row.what} | " + " | ".join(cells) + f" | {tol} | {row.why} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("run", "table", "worker"))
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rows", default=",".join(r.name for r in ROWS))
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--backend", default="single")
    a = p.parse_args(argv)
    rows = a.rows.split(",")
    if a.command == "worker":
        worker(a.backend, a.out, a.steps, rows)
    elif a.command == "run":
        run(a.out, a.steps, rows, a.backends.split(","))
        print(table(a.out, [b for b in a.backends.split(",") if b != "single"]))
    else:
        print(table(a.out, [b for b in a.backends.split(",") if b != "single"]))


if __name__ == "__main__":
    main()
