"""benchmarks/loop_overhead.py: its commands as exact argv, the throughput arithmetic, the
summary's medians and per-repeat ratios, result parsing; and that loop_refs.py builds
distbatch's models layer for layer. Nothing here runs a benchmark."""
from __future__ import annotations

import json

import pytest
from conftest import load_benchmark


lo = load_benchmark("loop_overhead")
refs = load_benchmark("loop_refs")
SETUP = lo.Setup(data="/d.npz", work="/w", python="/v/python", distbatch="/v/distbatch",
                 peer_python="/p/bin/python")
LAUNCH = ["/v/distbatch", "launch", "horovod", "--gloo", "-np", "2", "-H", "localhost:2", "--"]
COMMON = ["--data", "/d.npz", "--model", "mlp", "--steps", "300", "--global-batch-size", "256",
          "--lr", "0.4"]


def cmd(name, backend, model="mlp", steps=300, setup=SETUP):
    return lo.command(lo.Candidate(name, backend, model), steps, setup)


def test_distbatch_commands_are_the_cli_at_its_defaults():
    train = ["train", "--dataset", "/d.npz", "--model", "mlp", "--global-batch-size", "256",
             "--steps", "300"]
    assert cmd("distbatch", "single") == (
        ["/v/distbatch", "train", "--backend", "single", *train[1:], "--out", "/w/distbatch-single-mlp-300"], {})
    assert cmd("distbatch_spe1", "mirrored") == (
        ["/v/distbatch", "train", "--backend", "mirrored", *train[1:],
         "--out", "/w/distbatch_spe1-mirrored-mlp-300", "--cpu-replicas", "2",
         "--steps-per-execution", "1"], {})
    assert cmd("distbatch", "horovod", steps=1300) == (
        [*LAUNCH, "/v/distbatch", "train", "--backend", "horovod", "--dataset", "/d.npz", "--model", "mlp",
         "--global-batch-size", "256", "--steps", "1300", "--out", "/w/distbatch-horovod-mlp-1300"], {})


def test_reference_commands():
    refs_py = lo.REFS
    assert cmd("minimal", "mirrored") == (
        ["/v/python", refs_py, "minimal", *COMMON, "--strategy", "mirrored"], {})
    assert cmd("keras_fit", "single") == (
        ["/v/python", refs_py, "fit", *COMMON, "--strategy", "single", "--steps-per-execution", "1"], {})
    assert cmd("keras_fit_tuned", "single")[0][-2:] == ["--steps-per-execution", "32"]
    assert cmd("minimal", "horovod") == ([*LAUNCH, "/v/python", refs_py, "hvd-minimal", *COMMON], {})
    assert cmd("hvd_keras", "horovod") == (
        ["/p/bin/horovodrun", "--gloo", "-np", "2", "-H", "localhost:2", "/p/bin/python", refs_py,
         "hvd-keras", *COMMON, "--callbacks", "broadcast,metric_average"], {"TF_USE_LEGACY_KERAS": "1"})
    no_callbacks = lo.Setup(**{**SETUP.__dict__, "hvd_callbacks": ()})
    assert cmd("hvd_keras", "horovod", setup=no_callbacks)[0][-2:] == ["--callbacks", ""]
    assert refs.parse_args(["hvd-keras", "--data", "d", "--steps", "1", "--callbacks", ""]).callbacks == ()


def test_candidates_per_backend_and_without_peer():
    names = [c.key for c in lo.candidates(["mlp"], ["single", "horovod"], peer=True)]
    assert names == ["distbatch/single/mlp", "distbatch_spe1/single/mlp", "distbatch_xla/single/mlp",
                     "minimal/single/mlp", "keras_fit/single/mlp", "keras_fit_tuned/single/mlp",
                     "distbatch/horovod/mlp", "distbatch_spe1/horovod/mlp", "distbatch_xla/horovod/mlp",
                     "minimal/horovod/mlp", "hvd_keras/horovod/mlp"]
    only = lo.candidates(["mlp"], ["single"], peer=True, only=("distbatch", "distbatch_xla"))
    assert [c.key for c in only] == ["distbatch/single/mlp", "distbatch_xla/single/mlp"]
    assert all(c.name != "hvd_keras" for c in lo.candidates(["mlp", "convnet"], lo.BACKENDS, peer=False))


@pytest.mark.parametrize("s1,s2,w1,w2,expected", [
    (300, 1300, 10.0, 15.0, 1000 * 256 / 5.0),   # 51,200 samples/s
    (50, 150, 8.0, 8.5, 100 * 256 / 0.5),
    (300, 1300, 10.0, 10.0, None),               # no time difference: no rate
    (300, 1300, 10.0, 9.0, None),                # the longer run was faster: noise, no rate
])
def test_throughput_is_differential(s1, s2, w1, w2, expected):
    assert lo.throughput(s1, s2, w1, w2, 256) == (pytest.approx(expected) if expected else None)


def _row(name, rep, steps, wall, ok=True, spe=1):
    return {"candidate": name, "backend": "single", "model": "mlp", "repeat": rep, "steps": steps,
            "wall_s": wall, "ok": ok, "steps_per_execution": spe, "error": None if ok else "ValueError: x"}


def test_summary_medians_and_per_repeat_ratios():
    # minimal: 100 extra steps in 1, 2, 4 s; distbatch: in 0.5, 2, 2 s (repeat 2's long run failed once).
    rows = []
    for rep, (dm, dd) in enumerate([(1.0, 0.5), (2.0, 2.0), (4.0, 2.0)]):
        rows += [_row("minimal", rep, 100, 10.0), _row("minimal", rep, 200, 10.0 + dm),
                 _row("distbatch", rep, 100, 10.0, spe=7), _row("distbatch", rep, 200, 10.0 + dd, spe=7)]
    rows.append(_row("distbatch", 3, 100, 10.0, spe=7))
    rows.append(_row("distbatch", 3, 200, 11.0, ok=False, spe=7))
    table = {r["candidate"]: r for r in lo.summarize(rows, 256)}
    unit = 100 * 256
    assert table["minimal"]["median_samples_per_s"] == pytest.approx(unit / 2)
    assert table["distbatch"]["median_samples_per_s"] == pytest.approx(unit / 2)
    assert (table["distbatch"]["repeats_valid"], table["distbatch"]["repeats"]) == (3, 4)
    assert table["distbatch"]["steps_per_execution"] == [7]
    # per repeat: 2.0, 1.0, 2.0 -> median 2.0; ratio of medians 1.0
    assert table["distbatch"]["vs_minimal"] == pytest.approx(2.0)
    assert table["distbatch"]["vs_minimal_of_medians"] == pytest.approx(1.0)
    assert table["minimal"]["vs_minimal"] == pytest.approx(1.0)
    assert "vs_keras_fit" not in table["distbatch"]
    md = lo.markdown(list(table.values()))
    assert "| distbatch | single | mlp | 7 | 12,800 | 3/4 | 7/8 | 2.00x (1.00x) |" in md
    assert "- distbatch/single/mlp failed: ValueError: x" in md


def test_parse_reference_output_checks_ranks_agree(tmp_path):
    line = lambda rank, w: f"[{rank}]<stdout>:LOOP_REFS " + json.dumps(  # noqa: E731
        {"program": "hvd-keras", "rank": rank, "steps": 300, "evals": 5, "val_loss": 0.5,
         "val_accuracy": 0.8, "weights_sum": w, "callbacks": ["broadcast"]})
    c = lo.Candidate("hvd_keras", "horovod", "mlp")
    same = lo.parse_result(c, "noise\n" + line(1, -940.5) + "\n" + line(0, -940.5) + "\n", str(tmp_path))
    assert same["steps_done"] == 300 and same["ranks"] == 2 and same["ranks_agree"]
    assert same["callbacks"] == ["broadcast"] and not same["diverged"]
    drifted = lo.parse_result(c, line(0, -940.5) + "\n" + line(1, -941.0), str(tmp_path))
    assert drifted["ranks_agree"] is False
    assert lo.parse_result(c, "no result", str(tmp_path)) == {}


def test_last_error_reads_rank_prefixed_logs():
    log = ("[1]<stderr>:Traceback (most recent call last):\n"
           "[1]<stderr>:AttributeError: module 'keras.backend' has no attribute 'constant'\n"
           "Process 1 exit with status code 1.\n"
           "RuntimeError: Horovod detected that one or more processes exited with non-zero status\n")
    assert lo.last_error(log) == "AttributeError: module 'keras.backend' has no attribute 'constant'"
    assert lo.last_error("all fine") is None
    assert lo.last_error("x\nValueError: bad\n") == "ValueError: bad"
    graph = ("[0]<stderr>:tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph execution error:\n"
             "[0]<stderr>:  File \"step.py\", line 3, in eval_step\n"
             "[0]<stderr>:Requested to allreduce a tensor with the same name\n"
             "[0]<stderr>:\t [[{{node while/HorovodGroupedAllreduce}}]] [Op:__inference_eval_step_899]\n")
    assert lo.last_error(graph) == ("tensorflow.python.framework.errors_impl.InvalidArgumentError: Graph "
                                    "execution error: Requested to allreduce a tensor with the same name")


@pytest.mark.parametrize("name", ["mlp", "convnet"])
def test_reference_models_are_distbatch_models(name):
    keras = pytest.importorskip("keras")
    from distbatch.models import build_model
    ours, theirs = refs.build_model(keras, name, (40,), 10), build_model(name, (40,), 10)
    describe = lambda m: [(type(layer).__name__, tuple(layer.output.shape), layer.count_params(),  # noqa: E731
                           layer.get_config().get("activation"), layer.dtype_policy.name) for layer in m.layers]
    assert describe(ours) == describe(theirs)
