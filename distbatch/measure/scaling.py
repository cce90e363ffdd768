"""`distbatch bench`'s inputs and tables, without TensorFlow: the batch it runs, the replica
counts, baseline files and scaling efficiency (the measurement itself: distbatch/measure/bench.py,
which re-exports all of these). The CLI's parser and checks read them before TensorFlow loads.

Scaling efficiency (weak or strong, depending on which batch is held fixed):

    efficiency(N) = throughput(N) / ((N / n0) * throughput(n0)),   n0 = 1 usually
"""
from __future__ import annotations

import json
from typing import Sequence

from distbatch.errors import ParameterError, require, require_param
from distbatch.shapes import parse_shape

SCHEMA = "distbatch.bench/1"
SCALING_SCHEMA = "distbatch.bench-scaling/1"
DEFAULT_PER_REPLICA_BATCH = 64
LOGICAL_CPU_NOTE = ("logical CPU replicas share the same cores: they test the distributed "
                    "paths, not speed")


def parse_input_shape(text: str) -> tuple[int, ...]:
    """'32x32x3' or '32,32,3' -> (32, 32, 3); '40' -> (40,) (distbatch.shapes.parse_shape)."""
    try:
        return parse_shape(text)
    except ParameterError as e:
        raise e.for_flags() from None


def parse_replica_list(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (sorted, unique, each >= 1)."""
    try:
        counts = [int(p) for p in str(text).split(",") if p.strip()]
    except ValueError:
        counts = None
    problem = ("must be comma-separated integers" if counts is None else
               "must name at least one count" if not counts else
               "counts must be >= 1" if not all(c >= 1 for c in counts) else None)
    if problem:  # the flag's own text, parsed here for the CLI only (as parse_input_shape)
        raise ParameterError(f"{{cpu_replicas_list}} {problem}, got {text!r}",
                             "cpu_replicas_list").for_flags()
    return sorted(set(counts))


def scaling_efficiency(throughput: float, replicas: int, base_throughput: float,
                       base_replicas: int = 1) -> float:
    """throughput(N) / ((N / n0) * throughput(n0)); 1.0 = perfect linear scaling."""
    require(replicas >= 1 and base_replicas >= 1,
            f"replica counts must be >= 1, got {replicas} and {base_replicas}")
    require(base_throughput > 0, f"baseline throughput must be > 0, got {base_throughput}")
    return float(throughput) / (replicas / base_replicas * float(base_throughput))


def efficiency_table(results: Sequence[dict]) -> list[dict]:
    """One row per bench result, efficiency against the smallest replica count."""
    require(bool(results), "no bench results to tabulate")
    ordered = sorted(results, key=lambda r: r["replicas"])
    base = ordered[0]
    rows = []
    for r in ordered:
        agg = r["samples_per_sec"]
        rows.append({"replicas": r["replicas"], "global_batch_size": r["global_batch_size"],
                     "per_replica_batch_size": r["per_replica_batch_size"],
                     "samples_per_sec": agg["mean"], "ci95": agg["ci95"],
                     "per_replica_samples_per_sec": agg["mean"] / r["replicas"],
                     "efficiency": scaling_efficiency(agg["mean"], r["replicas"],
                                                      base["samples_per_sec"]["mean"],
                                                      base["replicas"])})
    return rows


def format_table(rows: Sequence[dict]) -> str:
    lines = [f"{'replicas':>8} {'global batch':>12} {'samples/s (mean +- 1.96 std)':>30} "
             f"{'per replica':>12} {'efficiency':>10}"]
    for r in rows:
        lines.append(f"{r['replicas']:>8} {r['global_batch_size']:>12} "
                     f"{r['samples_per_sec']:>16,.1f} +- {r['ci95']:<10,.1f} "
                     f"{r['per_replica_samples_per_sec']:>12,.1f} {r['efficiency']:>10.3f}")
    return "\n".join(lines)


def resolve_batch(per_replica: int | None, global_batch: int | None, replicas: int) -> tuple[int, int]:
    """(per_replica_batch, global_batch) from whichever one the user gave (default per-replica 64)."""
    if per_replica is not None and global_batch is not None:
        raise ParameterError(f"give {{per_replica_batch_size}} ({per_replica}) or "
                             f"{{global_batch_size}} ({global_batch}), not both",
                             "per_replica_batch_size", "global_batch_size")
    if global_batch is not None:
        require_param(global_batch >= 1, f"{{global_batch_size}} must be >= 1, got {global_batch}",
                      "global_batch_size")
        require_param(global_batch % replicas == 0, f"{{global_batch_size}} {global_batch} is not "
                      f"divisible by the {replicas} replicas", "global_batch_size")
        return global_batch // replicas, global_batch
    b = DEFAULT_PER_REPLICA_BATCH if per_replica is None else per_replica
    require_param(b >= 1, f"{{per_replica_batch_size}} must be >= 1, got {b}", "per_replica_batch_size")
    return b, b * replicas


def load_baseline(path: str) -> dict:
    """A bench JSON written by `distbatch bench` (its ``json`` file; a single run, not a scaling
    table). Errors name the flag ``baseline`` (the CLI's only; see _baseline_error)."""
    try:
        with open(path, "rb") as f:  # decoded whole, so an error's offset is the file's
            data = json.loads(f.read().decode("utf-8"))
    except OSError as e:
        raise _baseline_error(f"{{baseline}} {path!r}: cannot read it ({e.strerror})", "baseline") from None
    except json.JSONDecodeError as e:
        raise _baseline_error(f"{{baseline}} {path!r} is not JSON ({e.msg} at char {e.pos})",
                              "baseline") from None
    except UnicodeDecodeError as e:  # a binary file (an .npz, a checkpoint) given by mistake
        raise _baseline_error(f"{{baseline}} {path!r} is not a text file (byte 0x{e.object[e.start]:02x} "
                              f"at offset {e.start} is not UTF-8); expected the JSON that `distbatch "
                              "bench {json}` writes", "baseline", "json") from None
    except RecursionError:
        raise _baseline_error(f"{{baseline}} {path!r} is not JSON (nested too deeply)", "baseline") from None
    ok = (isinstance(data, dict) and data.get("schema") == SCHEMA
          and isinstance(data.get("replicas"), int)
          and isinstance(data.get("samples_per_sec"), dict) and "mean" in data["samples_per_sec"])
    if not ok:
        raise _baseline_error(f"{{baseline}} {path!r} is not a `distbatch bench {{json}}` file of "
                              f"schema {SCHEMA}", "baseline", "json")
    return data


def _baseline_error(template: str, *params: str):
    """A baseline file is a flag of `distbatch bench` only: its errors are the CLI's lines (as
    parse_input_shape's), also where cli/bench.py's handler is called without the CLI."""
    return ParameterError(template, *params).for_flags()


def check_baseline_matches(result: dict, baseline: dict) -> None:
    """Efficiency compares like with like: same model, input shape and per-replica batch."""
    for key in ("model", "input_shape", "num_classes", "per_replica_batch_size"):
        if result[key] != baseline[key]:
            raise ParameterError(f"{{baseline}} was measured with {key} {baseline[key]!r}, this "
                                 f"run uses {result[key]!r}; efficiency needs the same workload",
                                 "baseline")


# -- the scale-out model (docs/scaling.md; benchmarks/scale_out.py fits and checks it) ----------

# The share of the all-reduce engine's time (copies, reduction) hidden behind the wire in the
# "engine" (pipeline) form of the model: 1/2, picked from the 1 Gbit/s points of
# benchmarks/results/scale_out/2026-11-26_1gbit_unlimited_after_loop_fixes and checked at
# 3 Gbit/s (benchmarks/results/scale_out/2026-11-27_3gbit_unlimited_one_group; docs/scaling.md).
ENGINE_HIDDEN = 0.5


def ring_bytes(grad_bytes: float, n: int) -> float:
    """Bytes each worker sends (and receives) in one ring all-reduce of `grad_bytes` over `n`
    workers: 2(n-1)/n x grad_bytes (reduce-scatter, then all-gather); 0 for one worker."""
    return 2 * (n - 1) / n * grad_bytes if n > 1 else 0.0


def allreduce_seconds(grad_bytes: float, bandwidth: float, n: int, *, latency: float = 0.0,
                      messages: int = 1, overlap: float = 0.0, engine: float | None = None,
                      engine_hidden: float = ENGINE_HIDDEN) -> float:
    """Seconds one step spends in the ring all-reduce beyond compute:

        wire    = (1 - overlap) x 2(n-1)/n x bytes / bandwidth
        t_comm  = wire                                              (no `engine`)
                = max(wire, eng) + (1 - engine_hidden) x min(wire, eng),
                  eng = 2(n-1)/n x bytes / engine                   (`engine` in bytes/s)
        + 2(n-1) x latency x messages        (a ring all-reduce is 2(n-1) sequential sends)

    `engine`: the rate the all-reduce reaches when the wire is free (its copies and reduction
    on the worker's core); the slower stage sets the pace, `engine_hidden` of the faster one
    hides behind it. 0 for one worker."""
    if n <= 1:
        return 0.0
    share = ring_bytes(grad_bytes, n)
    t_comm = (1 - overlap) * share / bandwidth
    if engine:
        t_engine = share / engine
        t_comm = max(t_comm, t_engine) + (1 - engine_hidden) * min(t_comm, t_engine)
    return t_comm + 2 * (n - 1) * latency * messages


def predicted_efficiency(t_compute: float, grad_bytes: float, bandwidth: float, n: int,
                         overlap: float = 0.0, engine: float | None = None,
                         engine_hidden: float = ENGINE_HIDDEN, latency: float = 0.0,
                         messages: int = 1) -> float:
    """Weak-scaling efficiency of the ring model: t_compute / (t_compute + t_comm), t_comm from
    :func:`allreduce_seconds` (every worker keeps its batch; 1.0 for one worker)."""
    return t_compute / (t_compute + allreduce_seconds(
        grad_bytes, bandwidth, n, latency=latency, messages=messages, overlap=overlap,
        engine=engine, engine_hidden=engine_hidden))
