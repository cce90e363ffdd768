"""The simple gradient noise scale (McCandlish et al. 2018, "An Empirical Model
of Large-Batch Training", appendix A.1).

    B_simple = tr(Sigma) / |G|^2

Sigma is the per-example gradient covariance, G the true gradient. From the
squared norms of gradients averaged over two batch sizes B_small < B_big
(both unbiased under i.i.d. sampling):

    |G|^2 ~ (B_big |g_big|^2 - B_small |g_small|^2) / (B_big - B_small)
    S     ~ (|g_small|^2 - |g_big|^2) / (1/B_small - 1/B_big)        (S estimates tr(Sigma))

Each single-step estimate is very noisy, so separate exponential moving
averages of S and |G|^2 are kept and their RATIO is reported (not an average of
per-step ratios). In data-parallel training this is almost free: B_small is
the per-replica (micro-)batch, whose gradient norm is taken before the
all-reduce, and B_big the global batch, after it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


def unbiased_estimates(small_sq: float, big_sq: float, b_small: int, b_big: int
                       ) -> tuple[float, float]:
    """(|G|^2 estimate, tr(Sigma) estimate) from mean squared norms at two batch sizes."""
    if not 0 < b_small < b_big:
        raise ValueError(f"need 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}")
    g2 = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    s = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return g2, s


@dataclass
class NoiseScaleTracker:
    """Bias-corrected EMAs of |G|^2 and S; b_simple is their ratio."""

    b_small: int
    b_big: int
    beta: float = 0.99
    steps: int = 0
    ema_g2: float = 0.0
    ema_s: float = 0.0
    trajectory: list = field(default_factory=list)
    skipped: int = 0  # steps with non-finite norms, left out of the averages

    def update(self, small_sq: float, big_sq: float, step: int | None = None) -> float | None:
        if not (math.isfinite(small_sq) and math.isfinite(big_sq)):
            # A step whose gradients overflowed (float16 loss scaling skips it too) must not
            # poison the averages for the rest of the run.
            self.skipped += 1
            return self.b_simple
        g2, s = unbiased_estimates(small_sq, big_sq, self.b_small, self.b_big)
        self.steps += 1
        self.ema_g2 = self.beta * self.ema_g2 + (1 - self.beta) * g2
        self.ema_s = self.beta * self.ema_s + (1 - self.beta) * s
        value = self.b_simple
        if step is not None and value is not None:
            self.trajectory.append((int(step), value))
        return value

    def state(self) -> dict:
        """The averages, for a checkpoint (restore() gives back exactly this tracker)."""
        return {"steps": self.steps, "ema_g2": self.ema_g2, "ema_s": self.ema_s,
                "skipped": self.skipped, "trajectory": list(self.trajectory)}

    def restore(self, state: dict) -> None:
        self.steps, self.ema_g2, self.ema_s = state["steps"], state["ema_g2"], state["ema_s"]
        self.skipped = state.get("skipped", 0)
        self.trajectory = [tuple(t) for t in state.get("trajectory", [])]

    @property
    def corrected(self) -> tuple[float, float]:
        c = 1 - self.beta ** self.steps if self.steps else 1.0
        return self.ema_g2 / c, self.ema_s / c

    @property
    def b_simple(self) -> float | None:
        """EMA(S) / EMA(|G|^2); None until |G|^2's average is positive."""
        g2, s = self.corrected
        return s / g2 if self.steps and g2 > 0 else None
