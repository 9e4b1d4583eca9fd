"""The `divebatch` command: smoke runs with tiny budgets and the bad-argument cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from divebatch.cli import main

try:
    import divebatch.tracker  # noqa: F401
    HAVE_TRACKER = True
except Exception:  # noqa: BLE001
    HAVE_TRACKER = False

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--epochs", "2", "--batch-size", "32", "--max-batch-size", "256",
        "--resize-every", "1", "--no-progress"]


def run_main(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors and --help
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.skipif(not HAVE_TRACKER, reason="divebatch.tracker does not import yet")
def test_train_smoke(tmp_path, capsys):
    code, out, err = run_main(["train", "--policy", "divebatch", *TINY, "--out", str(tmp_path / "run")], capsys)
    assert code == 0, err
    assert "final test accuracy" in out
    assert "epoch   1/2" in err or "epoch   1/2" in out  # one line per epoch (tqdm.write → stdout)
    run = tmp_path / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["dataset"] == "digits"
    for png in ("accuracy.png", "batch_lr.png", "diversity.png"):
        assert (run / png).exists()


def test_train_sgd_synthetic(tmp_path, capsys):
    code, out, err = run_main(["train", "--policy", "sgd", "--dataset", "synthetic", "--epochs", "1", "--batch-size",
                               "50", "--no-progress", "--quiet", "--out", str(tmp_path)], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "summary.json").read_text())["model"] == "logistic"


@pytest.mark.skipif(not HAVE_TRACKER, reason="divebatch.tracker does not import yet")
def test_compare_smoke(tmp_path, capsys):
    code, out, err = run_main(["compare", *TINY, "--out", str(tmp_path), "--quiet", "--probe-reps", "0"], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "results.json").read_text())
    labels = set(res["per_seed"]["0"]["runs"])
    assert labels == {"sgd-32", "sgd-256", "adabatch", "paper", "divebatch"}
    table = (tmp_path / "table.md").read_text()
    assert "speedup vs SGD" in table and "samples/s" in table
    assert (tmp_path / "compare.png").stat().st_size > 1000


@pytest.mark.skipif(not HAVE_TRACKER, reason="divebatch.tracker does not import yet")
def test_probe_throughput_reports_ratios():
    from divebatch.data import load_digits
    from divebatch.train import probe_throughput

    p = probe_throughput(load_digits(), batch_sizes=[256], reps=1, block_samples=256)
    assert set(p["ratio"][256]) == {"plain", "divebatch", "paper"}
    assert p["ratio"][256]["plain"] == 1.0 and all(v > 0 for v in p["samples_per_s"][256].values())


def test_help_is_complete(capsys):
    code, out, _ = run_main(["train", "--help"], capsys)
    assert code == 0
    for flag in ("--policy", "--dataset", "--data-dir", "--epochs", "--batch-size", "--max-batch-size", "--delta",
                 "--lr", "--resize-every", "--estimator", "--max-micro-batch", "--seed", "--out", "--amp"):
        assert flag in out
    code, out, _ = run_main(["compare", "--help"], capsys)
    assert code == 0 and "--seeds" in out and "common accuracy" in out


@pytest.mark.parametrize("argv,needle", [
    (["train", "--batch-size", "-4"], "batch-size must be a positive integer"),
    (["train", "--batch-size", "0"], "batch-size must be a positive integer"),
    (["train", "--max-batch-size", "-1"], "max-batch-size must be a positive integer"),
    (["train", "--batch-size", "256", "--max-batch-size", "128"], "--max-batch-size (128) must be >= --batch-size (256)"),
    (["train", "--delta", "0"], "delta must be > 0"),
    (["train", "--delta", "-0.5"], "delta must be > 0"),
    (["train", "--lr", "nan"], "lr must be > 0"),
    (["train", "--policy", "bogus"], "invalid choice: 'bogus'"),
    (["compare", "--epochs", "abc"], "epochs must be a positive integer"),
    (["train", "--max-growth", "0.5"], "max-growth must be > 1"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
])
def test_bad_arguments_one_line_no_traceback(argv, needle, capsys):
    code, out, err = run_main(argv, capsys)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert needle in lines[0] and "Traceback" not in err


def test_no_data_is_a_clear_error(tmp_path, capsys):
    code, out, err = run_main(["train", "--data-dir", str(tmp_path), "--epochs", "1"], capsys)
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no data" in lines[0] and "dataset-fashion-mnist" in lines[0]
    assert "--dataset digits" in lines[0] and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "divebatch", "train", "--batch-size", "-3"], capture_output=True,
                       text=True, env=env, cwd=tmp_path, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "batch-size must be a positive integer" in p.stderr
    assert "Traceback" not in p.stderr
