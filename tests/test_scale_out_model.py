"""benchmarks/scale_out.py's efficiency model and rate arithmetic (docs/scaling.md): pure
functions on rows; nothing here makes a namespace or runs a worker."""
from __future__ import annotations

import pytest
from conftest import load_benchmark


so = load_benchmark("scale_out")
MB = 1e6


def test_ring_model_moves_2_n_minus_1_over_n_of_the_bytes():
    # 2 workers: the whole gradient once; 40 ms compute + 34 MB at 125 MB/s (272 ms)
    assert so.predicted_efficiency(0.040, 34 * MB, 125 * MB, 2) == pytest.approx(0.040 / 0.312)
    # 8 workers: 2 x 7/8 of it
    assert so.predicted_efficiency(0.040, 34 * MB, 125 * MB, 8) == pytest.approx(
        0.040 / (0.040 + 1.75 * 0.272))
    assert so.predicted_efficiency(0.040, 34 * MB, 125 * MB, 1) == 1.0
    # full overlap hides all communication
    assert so.predicted_efficiency(0.040, 34 * MB, 125 * MB, 2, overlap=1.0) == 1.0


def test_engine_form_is_a_pipeline_the_slower_stage_sets_the_pace():
    # wire 136 ms, engine 150 ms: the engine sets the pace, half the wire is hidden behind it
    eff = so.predicted_efficiency(0.039, 17 * MB, 125 * MB, 2, engine=17 * MB / 0.150)
    assert eff == pytest.approx(0.039 / (0.039 + 0.150 + 0.068))
    # engine 50 ms on the same wire: the wire sets the pace, half the engine's time adds
    eff = so.predicted_efficiency(0.039, 17 * MB, 125 * MB, 2, engine=17 * MB / 0.050)
    assert eff == pytest.approx(0.039 / (0.039 + 0.136 + 0.025))
    none_hidden = so.predicted_efficiency(0.039, 17 * MB, 125 * MB, 2, engine=17 * MB / 0.150,
                                          engine_hidden=0.0)
    assert none_hidden == pytest.approx(0.039 / (0.039 + 0.136 + 0.150))
    all_hidden = so.predicted_efficiency(0.039, 17 * MB, 125 * MB, 2, engine=17 * MB / 0.150,
                                         engine_hidden=1.0)
    assert all_hidden == pytest.approx(0.039 / (0.039 + 0.150))   # the bottleneck form
    assert so.predicted_efficiency(0.039, 17 * MB, 125 * MB, 2, engine=None) == pytest.approx(
        0.039 / (0.039 + 0.136))


def _row(link, variant, steps, seconds, inproc, repeat, workers=2):
    return {"kind": "time", "link": link, "variant": variant, "steps": steps, "seconds": seconds,
            "inproc_samples_per_s": inproc, "repeat": repeat, "per_worker_batch": 128,
            "workers": workers}


def test_rates_are_medians_of_paired_differences_and_of_the_longer_runs():
    rows = [_row("1gbit", "db-hvd", 5, 9.0, 700.0, 0), _row("1gbit", "db-hvd", 45, 23.0, 740.0, 0),
            _row("1gbit", "db-hvd", 5, 9.5, 690.0, 1), _row("1gbit", "db-hvd", 45, 22.5, 750.0, 1),
            _row("1gbit", "db-hvd", 45, 22.0, 760.0, 2)]   # repeat 2 lost its short run
    diff = so.throughputs(rows)[("1gbit", "db-hvd")]
    assert diff == pytest.approx((40 * 256 / 14.0 + 40 * 256 / 13.0) / 2)
    assert so.inproc_throughputs(rows)[("1gbit", "db-hvd")] == 750.0   # long runs only


def test_paired_efficiency_uses_the_same_repeats_one_worker_run():
    rows = [_row("1gbit", "1w-distbatch", 10, 5.0, 3200.0, 0, workers=1),
            _row("1gbit", "1w-distbatch", 210, 12.0, 3000.0, 0, workers=1),
            _row("1gbit", "1w-distbatch", 210, 12.0, 2500.0, 1, workers=1),
            _row("1gbit", "1w-hvd-dgt-tf_keras", 210, 12.0, 2800.0, 1, workers=1),
            _row("1gbit", "db-hvd", 5, 9.0, 999.0, 0), _row("1gbit", "db-hvd", 45, 23.0, 750.0, 0),
            _row("1gbit", "db-hvd", 45, 23.0, 700.0, 1),
            _row("3gbit", "db-hvd", 45, 14.0, 1600.0, 1),      # baselines ran beside 1gbit only
            _row("1gbit", "hvd-dgt-tf_keras", 45, 21.0, 760.0, 0),  # repeat 0 has no tape baseline
            _row("1gbit", "hvd-dgt-tf_keras", 45, 21.0, 700.0, 1)]
    eff = so.paired_efficiencies(rows)
    assert eff[("1gbit", "db-hvd")] == pytest.approx([750 / 6000, 700 / 5000])
    assert eff[("3gbit", "db-hvd")] == pytest.approx([1600 / 5000])
    assert eff[("1gbit", "hvd-dgt-tf_keras")] == pytest.approx([700 / 5600])


def test_engine_rate_is_bytes_over_the_time_beyond_compute():
    base = {"1w-distbatch": 128 / 0.039}
    tp = {("unlimited", "db-hvd-fp16"): 256 / (0.039 + 0.150)}
    rate = so.engine_rate(tp, base, "db-hvd-fp16", "unlimited")
    assert rate == pytest.approx(so.PARAMS_MLP_WIDE * 2 / 0.150)
    assert so.engine_rate(tp, base, "db-hvd", "unlimited") is None   # not run there
    assert so.baseline_of("db-hvd-sgd") == "1w-distbatch-sgd"
    assert so.baseline_of("hvd-dgt-tf_keras") == "1w-hvd-dgt-tf_keras"
