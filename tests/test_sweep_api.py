"""distbatch.sweep(...) is `distbatch sweep` from Python: the same points, files and numbers."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli


def _rows(path):
    return {r["point_id"]: r for r in map(json.loads, (path / "results.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_sweep_from_python_equals_the_cli(tmp_path, dataset_cache):
    import distbatch
    rows = distbatch.sweep(out=str(tmp_path / "py"), batch_sizes=[32, 64], scalings=["linear", "adascale"],
                           epochs=1, train_size=512, val_size=128, model="mlp", progress=False)
    run_cli(["sweep", "--batch-sizes", "32,64", "--scaling", "linear,adascale", "--epochs", "1",
             "--train-size", "512", "--val-size", "128", "--model", "mlp", "--out", str(tmp_path / "cli")])
    py, cli = _rows(tmp_path / "py"), _rows(tmp_path / "cli")
    assert [r["point_id"] for r in rows] == list(py) and sorted(py) == sorted(cli)
    for pid, r in py.items():
        assert r["steps"] == cli[pid]["steps"], pid
        assert r["val_accuracy"] == pytest.approx(cli[pid]["val_accuracy"], abs=1e-6), pid
    assert (tmp_path / "py" / "report.md").is_file()


def test_sweep_settings_are_checked_by_name(tmp_path):
    import distbatch
    from distbatch.errors import ParameterError
    with pytest.raises(TypeError, match="unexpected setting"):
        distbatch.sweep(out=str(tmp_path / "s"), modle="mlp")
    with pytest.raises(ParameterError, match="epochs"):
        distbatch.sweep(out=str(tmp_path / "s"), epochs=-1)
    assert not (tmp_path / "s").exists()
