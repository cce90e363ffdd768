"""Measurement: probes, benchmarks, results, reports, recommendations (the gradient noise scale itself is computed in the loop: distbatch/training/noise_scale.py)."""
