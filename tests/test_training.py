"""End-to-end runs of the CLI on digits-lt: train + eval, kill + resume, eval of a checkpoint."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import REPO, run_cli, tiny_config

from jrcl_fast.data.sets.digits_lt import prepare_digits_lt

pytestmark = pytest.mark.slow


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_train_then_eval_writes_results(tmp_path, digits_root):
    config = tiny_config(tmp_path, digits_root)
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert results["num_test_images"] == sum(r["test_count"] for r in results["per_class"]) > 0
    assert set(results["shot_accuracy"]) == {"many", "medium", "few"}
    assert "balanced acc" in done.stdout and "Per-class accuracy" in done.stdout
    # Output to a pipe, as under a cluster scheduler: plain progress lines, at least one per epoch.
    steps = len((prepare_digits_lt(digits_root) / "train.txt").read_text().splitlines()) // 32
    progress = re.findall(r"^epoch (\d)/3 step (\d+)/(\d+) \d+ img/s loss \d+\.\d{4} ETA \d+:\d\d:\d\d$",
                          done.stdout, re.MULTILINE)
    assert {(epoch, step, total) for epoch, step, total in progress if step == total} == {
        (str(e), str(steps), str(steps)) for e in (1, 2, 3)}, done.stdout
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    for term in ("loss_ce", "loss_binary_ce", "loss_bdc", "loss_contrastive", "loss_total"):
        assert all(term in m for m in metrics)
    assert (run / "per_class_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # eval of the checkpoint reproduces the training run's results
    assert (run / "checkpoints" / "latest").read_text() == "epoch_0003"
    again = run_cli("eval", "--checkpoint", str(run / "checkpoints"), "--output-dir", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results

    # a second train into the same folder refuses rather than overwriting
    refused = run_cli("train", "--config", str(config))
    assert refused.returncode == 2 and "already holds a run" in refused.stderr


def test_weight_zero_switches_terms_off(tmp_path, digits_root):
    config = tiny_config(tmp_path, digits_root, loss={"lambda_con": 0.0, "lambda_bdc": 0.0, "lambda_bin": 0.0},
                         train={"epochs": 1})
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    (metrics,) = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert {k for k in metrics if k.startswith("loss_")} == {"loss_ce", "loss_total"}


def test_cosine_classifier_with_derived_prototypes_trains(tmp_path, digits_root):
    config = tiny_config(tmp_path, digits_root, model={"classifier": "cosine", "prototypes": "classifier"},
                         train={"epochs": 4, "batch_size": 32, "threads": 2})
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    losses = [m["loss_total"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert losses[-1] < 0.8 * losses[0], losses
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["balanced_accuracy"] > 2 * results["majority_baseline_balanced_accuracy"]


def test_killed_run_resumes_to_identical_results(tmp_path, digits_root):
    epochs = 4
    straight = tmp_path / "straight"
    straight.mkdir()
    config = tiny_config(straight, digits_root, train={"epochs": epochs})
    assert run_cli("train", "--config", str(config)).returncode == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    config_k = tiny_config(killed, digits_root, train={"epochs": epochs})
    metrics = killed / "run" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "jrcl_fast", "train", "--config", str(config_k)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 3 (or just after its checkpoint)
    proc.wait()
    assert not (killed / "run" / "results.json").exists()

    resumed = run_cli("train", "--config", str(config_k), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming" in resumed.stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert strip(read_jsonl(metrics)) == strip(read_jsonl(straight / "run" / "metrics.jsonl"))
    assert json.loads((killed / "run" / "results.json").read_text()) == json.loads(
        (straight / "run" / "results.json").read_text())
