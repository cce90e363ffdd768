"""`distbatch plan` (distbatch/measure/cluster_plan.py, distbatch/cli/plan.py): the model's
arithmetic against hand-computed numbers, the table's marks, every bad input's one line and exit
status; slow: the command end to end on a tiny real sweep."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import h5py
import numpy as np
import pytest

from distbatch.cli import main
from distbatch.cli import plan as plan_cli
from distbatch.errors import ParameterError
from distbatch.measure import cluster_plan as cp
from distbatch.measure.results import ROW_FIELDS, append_row

MB = 1e6


def row(batch, seed, steps, sps=1000.0, rule="linear", status="ok", replicas=1):
    r = {f: None for f in ROW_FIELDS}
    r.update(point_id=f"bs={batch}/seed={seed}/scaling={rule}", status=status, global_batch_size=batch,
             per_replica_batch_size=batch // replicas, replicas=replicas, backend="single", seed=seed,
             samples_per_sec=sps, steps_to_target=steps, diverged=False, scaling_rule=rule)
    return r


@pytest.fixture
def sweep(tmp_path):
    d = tmp_path / "sweep"
    # steps: 64 -> 400 and 440 (mean 420), 256 -> 100, 1024 never; samples/s -> t_1 = b / sps
    for b, seed, steps, sps in ((64, 0, 400, 3200.0), (64, 1, 440, 3200.0), (256, 0, 100, 6400.0),
                                (256, 1, 100, 6400.0), (1024, 0, None, 10240.0)):
        append_row(d, row(b, seed, steps, sps))
    return d


def test_links_and_worker_lists_parse():
    assert cp.parse_link("1gbit") == cp.Link(125e6, 0.0, "1gbit")
    link = cp.parse_link("2.5gbit,50us")
    assert (link.bandwidth, link.latency) == pytest.approx((2.5e9 / 8, 50e-6))
    assert cp.parse_link("957.3mbit,0").bandwidth == pytest.approx(957.3e6 / 8)
    assert cp.parse_link("100mbit,1ms").latency == pytest.approx(1e-3)
    assert cp.parse_workers("1,2,4,...,64") == [1, 2, 4, 8, 16, 32, 64]
    assert cp.parse_workers("2,5,...,11") == [2, 5, 8, 11]      # no integer ratio: +3
    assert cp.parse_workers("4,2,2") == [2, 4]
    for bad in ("", "0,1", "a", "1,2,...", "1,...,8", "2,4,...,10", "4,2,...,1", "1,2,...,1000000000"):
        with pytest.raises(ParameterError, match="workers"):
            cp.parse_workers(bad)
    with pytest.raises(ParameterError, match=r"^workers '2,4,\.\.\.,10': the sequence 2, 4, \.\.\. does not reach 10$"):
        cp.parse_workers("2,4,...,10")
    for bad in ("fast", "1gbit,50", "0mbit", "1gbit,50us,3", "-1gbit", "1gbit,xus", "nanmbit"):
        with pytest.raises(ParameterError, match="link"):
            cp.parse_link(bad)


def test_ring_time_latency_and_cells_match_hand_computed_numbers():
    stt = cp.StepsToTarget("linear", {256: (200.0, 0.0, 1)})
    times = cp.StepTimes({128: 0.040, 64: 0.025}, "test")
    link = cp.Link(125e6, 50e-6)
    c2 = cp.plan_cell(2, 256, stt, times, link, 34 * MB)
    # wire: 2(1)/2 x 34 MB / 125 MB/s = 0.272 s; latency: 2(2-1) x 50 us
    assert c2.comm_bound == pytest.approx(0.272)
    assert c2.t_comm == pytest.approx(0.272 + 100e-6)
    assert c2.t_step == pytest.approx(0.040 + 0.2721)
    assert c2.efficiency == pytest.approx(0.040 / 0.3121)
    assert c2.time_to_target == pytest.approx(200 * 0.3121)
    assert c2.cost == pytest.approx(2 * 200 * 0.3121)
    c4 = cp.plan_cell(4, 256, stt, times, link, 34 * MB, allreduces_per_step=3)
    # 2 x 3/4 x 0.272 s = 0.408 s; 2 x 3 sends x 3 all-reduces x 50 us
    assert c4.t_comm == pytest.approx(0.408 + 18 * 50e-6)
    assert c4.time_to_target == pytest.approx(200 * (0.025 + 0.4089))
    one = cp.plan_cell(1, 256, stt, cp.StepTimes({256: 0.07}, "t"), link, 34 * MB)
    assert (one.t_comm, one.efficiency, one.time_to_target) == (0.0, 1.0, pytest.approx(14.0))
    assert cp.plan_cell(3, 256, stt, times, link, 34 * MB).steps_how == "not divisible"


def test_steps_interpolate_in_log_batch_and_stop_at_the_unreached():
    stt = cp.StepsToTarget(None, {64: (400.0, 0, 1), 256: (100.0, 0, 1), 2048: (50.0, 0, 1)}, (1024,))
    assert stt.at(64) == (400.0, "measured")
    steps, how = stt.at(128)
    assert (steps, how) == (pytest.approx(200.0), "interpolated")   # sqrt(400 x 100)
    assert stt.at(512) == (None, "unreached")      # an unreached batch lies between 256 and 2048
    assert stt.at(1024) == (None, "unreached")
    assert stt.at(4096) == (None, "unreached")
    assert stt.at(32) == (None, "no estimate")


def test_step_time_interpolates_between_batches_and_extrapolates_a_line():
    t = cp.StepTimes({64: 0.010, 256: 0.030}, "t")
    assert t.at(128) == (pytest.approx(0.010 + 0.020 * 64 / 192), False)
    # the line through both points: t = 0.010/3 + b / 9600
    assert t.at(32) == (pytest.approx(0.010 / 3 + 32 / 9600), True)
    assert t.at(512) == (pytest.approx(0.010 / 3 + 512 / 9600), True)
    assert cp.StepTimes({64: 0.016}, "t").at(16) == (pytest.approx(0.004), True)  # through 0


def test_plan_marks_the_fastest_and_the_cheapest_cell(sweep):
    rows = cp.read_sweep(str(sweep))
    (stt,) = cp.steps_to_target(rows)
    assert stt.reached[64][:2] == (420.0, pytest.approx(28.28, abs=0.01)) and stt.unreached == (1024,)
    times = cp.step_times_from_sweep(rows)
    assert times.seconds == {64: 0.02, 256: 0.04, 1024: 0.1}
    plan = cp.make_plan(stt, times, cp.Link(125e6), 1 * MB, [1, 2, 4], [64, 256, 1024])
    by = {(c.workers, c.global_batch): c for c in plan.cells}
    # 1 MB: ring 8 ms at 2 workers, 12 ms at 4; t_1(128) = 20 + 20 x 64/192 ms (between 64 and 256)
    assert by[(1, 256)].time_to_target == pytest.approx(100 * 0.04)
    assert by[(2, 256)].time_to_target == pytest.approx(100 * (0.02 + 0.02 / 3 + 0.008))
    assert by[(4, 256)].time_to_target == pytest.approx(100 * (0.02 + 0.012))
    assert by[(4, 256)].marks == ["fastest"]                    # 3.2 s
    assert by[(1, 256)].marks == ["cheapest"]                   # 4.0 worker-s (2 workers: 5.6)
    assert by[(2, 1024)].time_to_target is None and by[(2, 1024)].steps_how == "unreached"
    text = cp.format_plan(plan)
    assert "FASTEST" in text and "CHEAPEST" in text and "unreached" in text
    assert "fastest: 4 worker(s) at global batch 256: 3.2 s, 12.8 worker-s" in text


def test_csv_only_sweeps_read_like_jsonl(sweep, tmp_path):
    csv_only = tmp_path / "csv_only"
    csv_only.mkdir()
    (csv_only / "results.csv").write_text((sweep / "results.csv").read_text())
    a, b = cp.read_sweep(str(sweep)), cp.read_sweep(str(csv_only))
    assert cp.steps_to_target(a) == cp.steps_to_target(b)


def _model_keras(path, shapes, layers_config):
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.parent / "w.h5"
    with h5py.File(weights, "w") as h5:
        for i, shape in enumerate(shapes):
            h5.create_dataset(f"layers/dense_{i}/vars/0", data=np.zeros(shape, np.float32))
        h5.create_dataset("optimizer/vars/0", data=np.zeros((1000,), np.float32))  # not a gradient
    with zipfile.ZipFile(path, "w") as z:
        z.write(weights, "model.weights.h5")
        z.writestr("config.json", json.dumps({"config": {"layers": layers_config}}))


def test_gradient_bytes_and_model_come_from_the_sweeps_model_file(sweep):
    layers = [{"class_name": "InputLayer", "config": {"batch_shape": [None, 40]}},
              {"class_name": "Dense", "config": {"units": 20}}, {"class_name": "Dense", "config": {"units": 10}}]
    _model_keras(sweep / "points" / "bs64_seed0" / "model.keras", [(40, 20), (20,), (20, 10), (10,)], layers)
    (sweep / "config.json").write_text(json.dumps({"model": "mlp"}))
    assert cp.gradient_bytes(str(sweep)) == 4 * (800 + 20 + 200 + 10)
    assert cp.model_of_sweep(str(sweep)) == ("mlp", (40,), 10)
    assert plan_cli.probe_argv("mlp", (40,), 10, 32, "/x.json", 3, 4) == [
        sys.executable, "-m", "distbatch.cli", "bench", "--backend", "single", "--model", "mlp",
        "--input-shape", "40", "--num-classes", "10", "--per-replica-batch-size", "32", "--iters", "3",
        "--steps-per-iter", "4", "--warmup-iters", "1", "--quiet", "--json", "/x.json"]


def test_step_time_file(tmp_path):
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"step_time_s": {"64": 0.02}}))
    assert cp.step_times_from_file(str(f)).seconds == {64: 0.02}


def run_cli(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_the_table_and_writes_json(sweep, tmp_path, capsys):
    code, out, err = run_cli(["plan", "--sweep", str(sweep), "--workers", "1,2,4", "--link", "1gbit",
                              "--grad-bytes", "1e6", "--json", str(tmp_path / "p.json")], capsys)
    assert code == 0, err
    assert "FASTEST" in out and "CHEAPEST" in out
    data = json.loads((tmp_path / "p.json").read_text())
    cells = {(c["workers"], c["global_batch"]): c for c in data["plans"][0]["cells"]}
    assert cells[(2, 256)]["time_to_target"] == pytest.approx(100 * (0.02 + 0.02 / 3 + 0.008))


def test_plan_process_never_loads_tensorflow(sweep):
    code = ("import sys; from distbatch.cli import main; "
            f"rc = main(['plan', '--sweep', {str(sweep)!r}, '--workers', '1,2', '--link', '1gbit', "
            "'--grad-bytes', '1000']); print(rc, 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == "0 False", out.stderr


@pytest.mark.parametrize("args, needle", [
    (["--sweep", "/nonexistent/sweep"], "--sweep '/nonexistent/sweep' is not a directory"),
    (["--sweep", "EMPTY"], "has no result rows"),
    (["--workers", "1,x"], "--workers must be positive integers"),
    (["--workers", "0,2"], "got '0,2'"),
    (["--link", "fast"], "--link must be \"1gbit\""),
    (["--link", "1gbit,50"], "got '1gbit,50'"),
    (["--batches", "a"], "--batches must be positive integers"),
    (["--step-time-from", "/nonexistent.json"], "--step-time-from '/nonexistent.json' is not"),
    (["--rule", "sqrt"], "--rule 'sqrt' is not in the sweep; it has linear"),
    (["--grad-bytes", "-5"], "--grad-bytes must be a finite number > 0, got -5"),
    (["--grad-bytes", "nan"], "--grad-bytes must be a finite number > 0, got nan"),
    (["--allreduces-per-step", "0"], "--allreduces-per-step must be >= 1, got 0"),
    (["--grad-bytes", None], "--grad-bytes: the sweep"),
])
def test_bad_inputs_give_one_line_naming_the_flag_and_exit_2(sweep, tmp_path, capsys, args, needle):
    (tmp_path / "EMPTY").mkdir()
    argv = {"--sweep": str(sweep), "--workers": "1,2", "--link": "1gbit", "--grad-bytes": "1000"}
    for flag, value in zip(args[::2], args[1::2]):
        if value is None:
            argv.pop(flag)
        else:
            argv[flag] = str(tmp_path / value) if value == "EMPTY" else value
    flat = [x for kv in argv.items() for x in kv]
    code, out, err = run_cli(["plan", *flat], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distbatch: error:"), err
    assert needle in lines[0] and "Traceback" not in err


@pytest.mark.slow
def test_plan_end_to_end_on_a_tiny_real_sweep(tmp_path):
    d = tmp_path / "sweep"
    sweep = [sys.executable, "-m", "distbatch.cli", "sweep", "--model", "mlp", "--dataset", "mnist1d",
             "--train-size", "1280", "--val-size", "256", "--batch-sizes", "32,64", "--epochs", "3",
             "--target-accuracy", "0.3", "--out", str(d)]
    done = subprocess.run(sweep, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    plan = [sys.executable, "-m", "distbatch.cli", "plan", "--sweep", str(d), "--workers", "1,2,...,4",
            "--link", "1gbit,100us", "--json", str(tmp_path / "p.json")]
    for source in ("sweep", "probe"):
        done = subprocess.run([*plan, "--step-time-from", source], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        (p,) = json.loads((tmp_path / "p.json").read_text())["plans"]
        # the mlp: 40*256+256 + 256*256+256 + 256*10+10 = 78,858 float32 weights
        assert p["grad_bytes"] == 78_858 * 4
        cells = {(c["workers"], c["global_batch"]): c for c in p["cells"]}
        c = cells[(2, 64)]
        assert c["comm_bound"] == pytest.approx(78_858 * 4 / 125e6)
        assert c["t_comm"] == pytest.approx(78_858 * 4 / 125e6 + 2 * 100e-6)
        if c["steps"] is not None:
            assert c["time_to_target"] == pytest.approx(c["steps"] * (c["t_1"] + c["t_comm"]))
        assert sum("fastest" in c["marks"] for c in p["cells"]) == (1 if any(
            c["time_to_target"] for c in p["cells"]) else 0)
        assert "one worker's step time from " + ("sweep" if source == "sweep" else "probe") in done.stdout
