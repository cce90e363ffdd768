"""The progress line the chief prints at each evaluation: epoch, step, the metrics of the
history record, throughput and the time left."""
from __future__ import annotations


def progress_line(rec: dict, epoch: float, step: int, total_steps: int, global_batch_size: int,
                  counters: dict) -> str:
    """"epoch   1.00 step 50/500  loss 0.6931 acc 0.5000 ...  12,345 samples/s  ETA 0:00:42"."""
    speed = (counters["timed_samples"] / counters["train_time"] if counters["train_time"] > 0
             else float("nan"))
    eta = ((total_steps - step) * global_batch_size / speed
           if speed == speed and speed > 0 else float("nan"))
    shown = " ".join(f"{k.replace('train_', '').replace('accuracy', 'acc')} {v:.4f}"
                     for k, v in rec.items() if isinstance(v, float) and k not in ("epoch", "lr"))
    return (f"epoch {epoch:6.2f} step {step}/{total_steps}  {shown}  "
            f"{speed:,.0f} samples/s  ETA {fmt_eta(eta)}")


def fmt_eta(seconds: float) -> str:
    """H:MM:SS, or "?" for NaN and infinity."""
    if not seconds == seconds or seconds == float("inf"):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
