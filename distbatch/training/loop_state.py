"""What the training loop carries from call to call (LoopState), and the files that keep it
beside each TensorFlow checkpoint of a run: ``state-<step>.json`` (history and the loop's
counters) and ``best-<step>.npz`` (early stopping's best weights), written before the
checkpoint itself, read back on resume, pruned with it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np

from distbatch.training.early_stopping import EarlyStopping, load_weights, weights_file


def zero_sums(size: int) -> dict:
    """Empty running sums of the loss and of a task's metric state of `size` numbers."""
    return {"loss_sum": 0.0, "metrics": np.zeros(size), "steps": 0}


def fresh_counters() -> dict:
    return {"train_time": 0.0, "timed_samples": 0, "steps_to_target": None, "time_to_target": None}


@dataclass
class LoopState:
    """What the loop carries from call to call (saved with every checkpoint, see checkpoint_state)."""
    step: int
    history: list
    sums: dict           # since the last evaluation: the history's train metrics
    window: dict         # since the last TensorBoard point / batch hook
    counters: dict       # train_time, timed_samples, steps_to_target, time_to_target
    stopped: bool = False
    diverged_step: int | None = None
    per_call: int = 1    # the first call compiles: one step, then steps_per_execution
    timed: bool = False  # the first call after the compile was timed (steps per call chosen)
    gains: list = field(default_factory=list)
    t_last: float | None = None
    last_lr: float | None = None


def checkpoint_state(loop: LoopState, tracker, early_stopping: EarlyStopping | None) -> dict:
    """The loop's counters as JSON-ready data, saved with a checkpoint (see restore_loop)."""
    plain = lambda s: {"loss_sum": s["loss_sum"], "metrics": s["metrics"].tolist(),  # noqa: E731
                       "steps": s["steps"]}
    return {"sums": plain(loop.sums), "window_count": loop.sums["steps"],
            "window": plain(loop.window), **loop.counters,
            "noise": tracker.state() if tracker is not None else None,
            "early_stopping": early_stopping.state() if early_stopping is not None else None,
            "stopped": loop.stopped}


def restore_loop(loop: LoopState, state: dict, task, global_batch_size: int) -> None:
    """Put a checkpoint's saved counters (checkpoint_state) back into `loop`."""
    loop.sums = restore_sums(state["sums"], state["window_count"], task, global_batch_size)
    window = state.get("window")
    loop.window = (restore_sums(window, window["steps"], task, global_batch_size) if window
                   else {k: np.copy(v) if k == "metrics" else v for k, v in loop.sums.items()})
    loop.counters = {k: state[k] for k in fresh_counters()}


def restore_sums(saved: dict, steps: int, task, global_batch_size: int) -> dict:
    metrics = saved.get("metrics")
    if metrics is None and "correct" in saved and task.metric_names == ["accuracy"]:
        # a checkpoint of distbatch <= 0.1 (argmax accuracy): its state is (correct, count)
        metrics = [saved["correct"], steps * global_batch_size]
    return {"loss_sum": saved["loss_sum"], "steps": steps,
            "metrics": np.asarray(metrics if metrics is not None else np.zeros(task.state_size),
                                  dtype=np.float64)}


def save_state(directory: str, step: int, history: list, state: dict) -> None:
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"state-{step}.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "history": history, "loop": state}, f)
    os.replace(path + ".tmp", path)


def prune_states(directory: str, kept_checkpoints: list) -> None:
    """Remove the state files of pruned checkpoints, and best weights no kept state names."""
    keep = {f"state-{p.rsplit('-', 1)[-1]}.json" for p in kept_checkpoints}
    for name in list(keep):
        try:
            with open(os.path.join(directory, name)) as f:
                best = ((json.load(f).get("loop") or {}).get("early_stopping") or {}).get("best_step")
        except (OSError, ValueError):
            continue
        if best is not None:
            keep.add(weights_file(best))
    for name in os.listdir(directory):
        if ((name.startswith("state-") and name.endswith(".json"))
                or (name.startswith("best-") and name.endswith(".npz"))) and name not in keep:
            os.remove(os.path.join(directory, name))


def restore_early_stopping(es: EarlyStopping | None, state: dict, directory: str) -> bool:
    """Early stopping's state from a checkpoint's loop state; True if the run had stopped."""
    saved = state.get("early_stopping")
    if es is not None and saved:
        best = saved["best_step"]
        es.restore(saved, load_weights(os.path.join(directory, weights_file(best)))
                   if best is not None else None)
    return bool(state.get("stopped", False))


def load_state(directory: str, step: int) -> tuple[list, dict]:
    """(history, loop counters) saved with the checkpoint of `step`."""
    path = os.path.join(directory, f"state-{step}.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        return saved["history"], saved["loop"]
    return [], {}
