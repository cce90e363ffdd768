"""Measurement: gradient noise scale, probes, benchmarks, results, reports, recommendations."""
