"""The benchmark scripts keep running: each one's CPU mode at tiny sizes, checking what
its JSON says it measured. The figures themselves depend on the machine and are not
checked (docs/BENCHMARKS.md records them)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_config
from PIL import Image
from scipy import stats

from jrcl_fast.checkpoint import CHECKPOINT_DIR, LATEST
from jrcl_fast.config import load_config
from jrcl_fast.data.augment import AUGMENTATIONS
from jrcl_fast.data.torch_loader import train_transform
from jrcl_fast.models import JRCLNet

pytestmark = pytest.mark.slow


def run_benchmark(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], check=False,
                          capture_output=True, text=True, cwd=REPO, timeout=900,
                          env={**os.environ, "COLUMNS": "160"})
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return done.stdout


def test_bench_data_rows_and_steps_are_the_loaders_own(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")  # bench_data sets DALI against torchvision
    from jrcl_fast.data.dali_loader import view_steps

    out, size = tmp_path / "data.json", 32
    run_benchmark("bench_data.py", "--folder", str(tmp_path / "images"), "--images", "16", "--batch-size", "8",
                  "--image-size", str(size), "--repeats", "1", "--workers", "1", "--steps", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {row["augmentation"] for row in rows} == {"natural", "xray"} and len(rows) == 3
    for row in rows:
        assert row["images"] == 16
        assert row["torch_images_per_s"] > 0 and row["dali_images_per_s"] > 0
        aug = AUGMENTATIONS[row["augmentation"]]
        steps = {path: [s["step"] for s in listed] for path, listed in row["steps_ms_per_image"].items()}
        # The breakdown times the very transforms the loaders run, after one decode.
        assert steps["DALI CPU"][1:] == [name for name, _ in view_steps(size, aug)]
        assert steps["torchvision"][1:] == [type(t).__name__ for t in train_transform(size, aug).transforms]
        ms = [s["ms"] for listed in row["steps_ms_per_image"].values() for s in listed]
        assert all(math.isfinite(m) for m in ms)
        assert all(row["steps_image_ms"][path] > 0 for path in steps)


def test_bench_losses_cpu_smoke_writes_eager_rows(tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    run_benchmark("bench_losses.py", "--quick", "--repeats", "2", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["gpu_figures"] is False and result["rows"]
    assert result["ce_bdc_logit_rows"] == "padded" and result["o2a_autotuned_tiles"] == []
    assert {row["loss"] for row in result["rows"]} == {"o2a", "ce_bdc"}
    for row in result["rows"]:
        assert row["impl"] == "eager" and row["status"] == "ok" and row["ms"] > 0


def test_bench_losses_peers_on_a_cpu_runs_the_checks_and_names_the_gpu_only_kernels(tmp_path: Path) -> None:
    pytest.importorskip("liger_kernel", reason="the [peers] extra: pip install -e '.[peers]'")
    out = tmp_path / "peers.json"
    stdout = run_benchmark("bench_losses.py", "--peers", "--quick", "--out", str(out))
    result = json.loads(out.read_text())
    assert result["gpu_figures"] is False and result["rows"] == []  # timings need a GPU
    assert {p["name"] for p in result["problems"]} == {c["problem"] for c in result["checks"]}
    assert all(check["status"] == "ok" for check in result["checks"])
    gpu_only = {c["problem"] for c in result["checks"] if "kernel_gpu_only" in c}
    assert gpu_only == {"infonce_vs_o2a", "linear_ce_vs_classifier_ce_bdc"}
    assert stdout.count("the peer's kernel is GPU-only") == len(gpu_only)


def test_bench_losses_peer_rows_set_each_peer_beside_ours_and_report_a_failing_side() -> None:
    """The GPU's peer rows, assembled on the CPU at a tiny shape: Liger's interpreted CE
    beside our CE+BDC, and Inf-CL, whose CUDA assertion becomes the row's status."""
    pytest.importorskip("liger_kernel", reason="the [peers] extra: pip install -e '.[peers]'")
    bench = load_benchmark("bench_losses.py")
    sys.path.insert(0, str(REPO / "benchmarks"))
    from loss_peers import PROBLEMS

    problems = {problem.name: problem for problem in PROBLEMS}
    rows = bench.peer_rows(problems["ce_vs_ce_bdc"], 8, 5, "fp32", warmup=1, repeats=2, device="cpu")
    assert [r.mode for r in rows] == ["fwd", "bwd", "fwd+bwd"] and all(r.status == "ok" for r in rows)
    for r in rows:
        assert (r.n, r.classes) == (8, 5) and r.ratio == pytest.approx(r.peer_ms / r.ours_ms)
        assert r.peer_ns_per_element == pytest.approx(r.peer_ms * 1e6 / 40)
    (row, *_) = bench.peer_rows(problems["infonce_vs_o2a"], 8, 5, "fp32", warmup=1, repeats=2, device="cpu")
    assert row.classes is None and row.peer_ms is None and row.ratio is None and row.ours_ms > 0
    assert row.status.startswith("peer error: AssertionError") and row.status.endswith("ours ok")


def load_benchmark(script: str):
    """A benchmark script as a module, to call its parts (with its folder on the path, for its imports)."""
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), REPO / "benchmarks" / script)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("padded,stride", [(True, 16), (False, 13)])
def test_bench_losses_times_the_gradient_of_the_logits_the_model_hands_over(padded: bool, stride: int) -> None:
    """CE+BDC gets the logits as a view of rows padded to LOGIT_ROW_ALIGNMENT classes (the
    vectorised path training runs) unless asked for dense rows, and the backward is timed
    up to the loss's own inputs: their gradient keeps the view's shape."""
    bench = load_benchmark("bench_losses.py")
    case = bench.Case("ce_bdc", 5, 13, "fp32")
    inputs, wrt = bench.ce_bdc_setup(case, "cpu", padded_rows=padded)
    assert inputs[0].shape == (5, 13) and inputs[0].stride() == (stride, 1) and wrt[0] is inputs[0]
    objective = bench.ce_bdc_objective(bench.ce_bdc_reference)
    grads = torch.autograd.grad(objective(*inputs), wrt)
    assert [g.shape for g in grads] == [(5, 13), (5, 2)] and all(torch.isfinite(g).all() for g in grads)
    ms, _ = bench.measure(objective, inputs, wrt, "fwd+bwd", warmup=1, repeats=2)
    assert ms > 0


def test_bench_losses_reports_the_tiles_the_autotuner_kept() -> None:
    """On a GPU the run records each O2A pass's chosen tile per launch shape: read from
    the autotuners' caches, filled here by hand (without the interpreter, as on a GPU)."""
    script = f"""
import json, sys
sys.path.insert(0, {str(REPO / "benchmarks")!r})
import bench_losses as bench
from jrcl_fast.kernels import o2a
o2a._o2a_fwd_kernel.cache[(4096, 4116, 128, "tf32x3", True, "torch.bfloat16")] = o2a.gpu_configs("fwd", 128, 2)[1]
print(json.dumps(bench.autotuned_tiles()))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (tile,) = json.loads(done.stdout.splitlines()[-1])
    assert tile["pass"] == "fwd" and tile["key"][:3] == ["4096", "4116", "128"]
    assert "BLOCK_N: 128" in tile["tile"] and "num_warps: 8" in tile["tile"]


def test_gpu_session_refuses_a_machine_without_a_gpu_and_names_only_files_that_exist(tmp_path: Path) -> None:
    """The one-call GPU script: its steps name scripts, tests and configs of this
    repository (a rename would break it on the GPU machine, where nothing can be fixed),
    and without a GPU it stops in one line before writing anything."""
    script = REPO / "benchmarks" / "gpu_session.sh"
    named = set(re.findall(r"(?:benchmarks|tests|configs)/[\w.]+\.(?:py|yaml|json)", script.read_text()))
    assert {"benchmarks/bench_losses.py", "tests/test_kernel_o2a.py", "configs/ds_config_fp16.json"} <= named
    assert [path for path in sorted(named) if not (REPO / path).is_file()] == []
    fake = tmp_path / "bin" / "nvidia-smi"  # as on a machine without a GPU, even on a GPU machine
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GPU_SESSION_ON_CPU", None)
    done = subprocess.run(["bash", str(script), str(tmp_path / "out")], capture_output=True, text=True, env=env,
                          timeout=60, check=False)
    assert done.returncode == 1 and "no GPU here" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_bench_losses_axes_can_be_chosen(tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    run_benchmark("bench_losses.py", "--sizes", "64", "--classes", "7", "--losses", "ce_bdc", "--impls", "eager",
                  "--repeats", "2", "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert {(r["loss"], r["n"], r["classes"], r["impl"]) for r in rows} == {("ce_bdc", 64, 7, "eager")}
    assert len(rows) == 3  # fwd, bwd, fwd+bwd


def test_bench_e2e_times_three_objectives(tmp_path: Path) -> None:
    out = tmp_path / "e2e.json"
    run_benchmark("bench_e2e.py", "--quick", "--batch", "2", "--image-size", "32", "--classes", "10",
                  "--out", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 and all(row["images_per_s"] > 0 for row in rows)
    assert [row["overhead_vs_ce_2_views"] is not None for row in rows] == [False, False, True]


def test_scaling_counts_every_parameter_of_the_model() -> None:
    stdout = run_benchmark("scaling.py", "--config", "configs/inat2018.yaml", "--classes", "8142")
    model = JRCLNet(load_config(REPO / "configs" / "inat2018.yaml").model, 8142)
    total = sum(p.numel() for p in model.parameters())
    assert f"| **total P** | **{total:,}** |" in stdout


def test_ablation_chooses_weights_on_validation_and_reports_every_seed(tmp_path: Path, mnist_root: Path) -> None:
    config = tiny_config(tmp_path, mnist_root, base="mnist_lt", train={"epochs": 1, "batch_size": 128})
    out = tmp_path / "ablation"
    run_benchmark("ablation.py", "--config", str(config), "--seeds", "0", "1", "--out", str(out),
                  "--json", str(tmp_path / "copy.json"), "--jobs", "2", "--set", "data.image_size=8")
    result = json.loads((out / "ablation.json").read_text())
    assert result == json.loads((tmp_path / "copy.json").read_text())
    assert list(result["summary"]) == list(result["variants"]) and len(result["variants"]) == 7
    grid_runs = sorted(p.parent.parent.name for p in out.glob("*/*/seed0/results.json"))
    assert len(grid_runs) == sum(math.prod(len(v) for v in spec["grid"].values()) for spec in result["variants"].values())
    for variant, spec in result["variants"].items():
        runs = [r for r in result["runs"] if r["variant"] == variant]
        assert [r["seed"] for r in runs] == [0, 1]
        # the chosen point is the grid's best on validation, and both seeds use it
        scores = {p.parent.parent.name: json.loads(p.read_text())["selection"]["best_value"]
                  for p in out.glob(f"{variant_slug(variant)}/*/seed0/results.json")}
        assert runs[0]["val"]["balanced_accuracy"] == max(scores.values())
        assert runs[0]["weights"] == runs[1]["weights"] == {**spec["fixed"], **result["chosen"][variant]}
        mean = result["summary"][variant]["balanced_accuracy"]["mean"]
        assert mean == pytest.approx(sum(r["test"]["balanced_accuracy"] for r in runs) / 2)
    summary_table, caption, paired_table = (out / "ablation.md").read_text().split("\n\n")
    assert len(summary_table.splitlines()) == 2 + 7 and result["paired"]["baseline"] in caption
    # 6 variants against the best baseline, and the 4 QUESTIONS whose variants mnist-lt has, less
    # the questions whose b is that baseline (CE + O2A - CE, if CE is best), shown once
    best, rows = result["paired"]["baseline"], result["paired"]["rows"]
    asked_of_best = sum(row["why"].endswith("(the best baseline)") for row in rows)
    assert asked_of_best == (best == "CE")
    assert len(paired_table.splitlines()) == 2 + 6 + 4 - asked_of_best == 2 + len(rows)


def test_a_failed_ablation_run_stops_the_ablation(tmp_path: Path, mnist_root: Path) -> None:
    config = tiny_config(tmp_path, mnist_root, base="mnist_lt", train={"epochs": 1})
    # every Python process started under this sitecustomize appends a line: the runs started
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(
        f"open({str(tmp_path / 'started.log')!r}, 'a').write('x\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "hook")}
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--config", str(config),
                           "--seeds", "0", "1", "--out", str(tmp_path / "out"), "--jobs", "2",
                           "--set", "data.image_size=-1"], capture_output=True, text=True, cwd=REPO, timeout=600, env=env)
    assert done.returncode != 0 and "failed" in done.stderr and "data.image_size" in done.stderr
    # the ablation and at most 4 runs (the 2 running when CE's failure is seen, and the 2 that
    # followed them before the queue was cancelled) of the 15 grid points
    assert 2 <= len((tmp_path / "started.log").read_text().splitlines()) <= 5


def variant_slug(name: str) -> str:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import slug

    return slug(name)


def test_ablation_interval_skips_missing_metrics_and_matches_the_t_formula() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import interval

    assert interval([None, None]) == {"mean": None, "ci95": None}
    assert interval([0.5, None]) == {"mean": 0.5, "ci95": 0.0}
    got = interval([0.5, None, 0.7, 0.6])  # n = 3, sd 0.1: t(0.975, 2) = 4.3027
    assert got["mean"] == pytest.approx(0.6) and got["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3))


def test_bench_decode_rows_cover_every_format_and_size(tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")  # the DALI CPU columns
    out = tmp_path / "decode.json"
    run_benchmark("bench_decode.py", "--images", "2", "--sizes", "96", "48", "--repeats", "1",
                  "--folder", str(tmp_path / "images"), "--json", str(out))
    result = json.loads(out.read_text())
    assert {(r["side"], r["format"]) for r in result["rows"]} == {
        (s, f) for s in (96, 48) for f in ("png", "jpeg", "jpeg2000")}
    for row in result["rows"]:
        assert row["images"] == 2 and row["kib_per_image"] > 0
        rates = [v for k, v in row.items() if k.startswith(("torch_", "dali_"))]
        assert len(rates) == 4 and all(math.isfinite(r) and r > 0 for r in rates)
    with Image.open(tmp_path / "images" / "jpeg2000_48" / "00001.jp2") as img:  # --max-side 48 of 1024 x 1024
        assert img.size == (48, 48) and img.mode == "L"


def test_bench_startup_times_every_phase_up_to_the_progress_bar(tmp_path: Path, digits_root: Path) -> None:
    out = tmp_path / "startup.json"
    run_benchmark("bench_startup.py", "--config", str(tiny_config(tmp_path, digits_root)), "--runs", "1",
                  "--cold-metadata", "--json", str(out))
    (run,) = json.loads(out.read_text())["runs"]
    marks = list(run.values())
    assert None not in marks and marks == sorted(marks) and list(run)[-1] == "progress bar"


def test_results_examples_render_the_screen_and_plot_at_8142_classes(tmp_path: Path) -> None:
    run_benchmark("results_examples.py", "--out", str(tmp_path))
    screen = (tmp_path / "results_screen_8142_synthetic.txt").read_text().splitlines()
    assert max(map(len, screen)) <= 80 and "of 8,142 classes" in "\n".join(screen)
    with Image.open(tmp_path / "per_class_accuracy_8142_synthetic.png") as plot:
        assert plot.format == "PNG"

def test_ablation_resumes_a_killed_run_and_evaluates_a_trained_one(tmp_path: Path, mnist_root: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import run_command, train

    config = str(tiny_config(tmp_path, mnist_root, base="mnist_lt", train={"epochs": 6, "batch_size": 128}))
    out = tmp_path / "runs" / "ce" / "seed0"
    settings = {"loss.lambda_con": 0, "loss.lambda_bdc": 0, "loss.lambda_bin": 0}
    first = run_command(config, settings, ["train.threads=1"], 0, out)
    assert "--overwrite" in first and "--resume" not in first
    run = subprocess.Popen(first, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "latest").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    run.kill()  # SIGKILL, as a machine stop does
    run.wait()
    epoch_one = (out / "metrics.jsonl").read_text().splitlines()[0]
    assert not (out / "results.json").exists()
    # a later ablation with another thread count: resumed with the run's own count, not restarted
    result = train(config, settings, ["train.threads=2"], 0, out)
    log = (out / "train.log").read_text()
    command = [line for line in log.splitlines() if line.startswith("$ ")][-1]
    assert "--resume" in command and command.endswith("--set train.threads=1") and "Resuming" in log
    assert (out / "metrics.jsonl").read_text().splitlines()[0] == epoch_one  # its timing: not run again
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 6
    # trained but killed before its results: evaluated, not trained again
    (out / "results.json").unlink()
    again = train(config, settings, [], 0, out)
    # the same selected weights (eval may run at another thread count: a near tie may flip)
    assert again["val"] == result["val"]
    assert again["test"]["balanced_accuracy"] == pytest.approx(result["test"]["balanced_accuracy"], abs=2e-3)
    last = [line for line in (out / "train.log").read_text().splitlines() if line.startswith("$ ")][-1]
    assert last.split()[4] == "eval"


def fake_score(run: Path) -> int:
    """A run's made-up validation score: a hash of its folder below --out (variant, grid point, seed)."""
    return zlib.crc32("/".join(run.parts[-3:]).encode())


def fake_runs(jobs: int) -> tuple[list, list, Callable]:
    """A stand-in for train(): records each run's start and end, checks that no more than
    `jobs` run at once, leaves a checkpoint folder as train() does, scores each run by
    fake_score."""
    started, finished, lock = [], [], threading.Lock()

    def run(settings: dict, seed: int, folder: Path) -> dict:
        with lock:
            started.append((settings, seed, folder))
            assert len(started) - len(finished) <= jobs
        time.sleep(random.uniform(0, 0.01))  # runs end in a fresh order
        (folder / "checkpoints").mkdir(parents=True)
        with lock:
            finished.append(folder)
        return {"val": {"balanced_accuracy": fake_score(folder) / 2**32, "epoch": 1}, "test": {}}

    return started, finished, run


class MachineLost(Exception):
    pass


def animal_lt_study(out: Path, config: str = "c.yaml") -> tuple[argparse.Namespace, list]:
    from ablation import STUDIES, VARIANTS

    return (argparse.Namespace(seeds=[0, 1], out=out, config=config, extra=[]),
            [VARIANTS[name] for name in STUDIES["animal_lt"]])


@pytest.mark.parametrize("lost_after", range(11, 23))  # after cRT's runs (the 10th), to the last of 23
def test_an_ablation_continues_from_its_ledger_on_a_new_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                lost_after: int) -> None:
    """The ledger, rewritten after each run, lets a clone with an empty --out (spelled another
    way) continue a lost ablation: what it holds is not run again, a variant it has chosen
    runs no grid, and the result is that of one uninterrupted ablation."""
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import Ledger, Study

    args, study = animal_lt_study(tmp_path / "out")
    ledger = tmp_path / "ledger.json"
    whole = Study(args, study).runs(fake_runs(jobs=2)[2], jobs=2)
    assert len(Study(args, study).tasks()) == 23
    shutil.rmtree(args.out)
    started, _, run = fake_runs(jobs=1)  # one run at a time, and the machine lost before the next

    def run_until_lost(settings: dict, seed: int, folder: Path) -> dict:
        if len(started) == lost_after:
            raise MachineLost
        return run(settings, seed, folder)

    with pytest.raises(MachineLost):
        Study(args, study, Ledger(ledger, args.out)).runs(run_until_lost, jobs=1)
    shutil.rmtree(args.out)
    saved = json.loads(ledger.read_text())
    assert len(saved["runs"]) == lost_after
    first = {folder.relative_to(args.out) for _, _, folder in started}

    monkeypatch.chdir(tmp_path)
    args.out = Path("out")
    started, _, run = fake_runs(jobs=2)
    continued, settled = Study(args, study, Ledger(ledger, args.out)), []
    left = len(continued.tasks())
    assert continued.runs(run, 2, lambda: settled.append(1)) == whole
    assert len(settled) == left  # the progress bar reaches its total
    again = {folder.relative_to(args.out) for _, _, folder in started}
    assert not first & again and len(first | again) == len(json.loads(ledger.read_text())["runs"])
    assert all(folder.name != "seed0" for _, _, folder in started if folder.parent.parent.name in
               {variant_slug(name) for name in saved["chosen"]})  # a chosen variant's grid did not run again
    saved = json.loads(ledger.read_text())
    forgotten = sorted(key for key in saved["runs"] if key.endswith("/seed1"))[-1]
    del saved["runs"][forgotten]
    ledger.write_text(json.dumps(saved))
    started, _, run = fake_runs(jobs=2)
    rewrites = []
    monkeypatch.setattr(Ledger, "save", lambda self: rewrites.append(sorted(self.runs)))
    assert Study(args, study, Ledger(ledger, args.out)).runs(run, 2) == whole
    # only the run the ledger lacks runs again, and the ledger is rewritten once, for it
    assert [folder.relative_to(args.out).as_posix() for _, _, folder in started] == [forgotten]
    assert len(rewrites) == 1 and forgotten in rewrites[0]


def test_an_ablation_reads_its_status_from_the_ledger(tmp_path: Path) -> None:
    """A grid point the ledger lacks is not needed once its variant is chosen, unless it is
    the chosen one, whose first seed runs again; the records come from the ledger."""
    import shutil

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import Ledger, Study

    args, study = animal_lt_study(tmp_path / "out")
    ledger = tmp_path / "ledger.json"
    whole = Study(args, study, Ledger(ledger, args.out)).runs(fake_runs(jobs=2)[2], jobs=2)
    saved = json.loads(ledger.read_text())
    chosen = Study(args, study, Ledger(ledger, args.out)).folders["logit-adjusted CE"] / "seed0"
    grid = [key for key in saved["runs"] if key.startswith("logit_adjusted_ce/") and key.endswith("/seed0")]
    [unchosen] = [key for key in grid if args.out / key != chosen]
    del saved["runs"][unchosen]
    ledger.write_text(json.dumps(saved))
    looked = Study(args, study, Ledger(ledger, args.out))
    standing = looked.status()
    assert sorted(standing[0]["grid"]) == ["done", "not needed"] and standing[0]["seeds"] == {1: "done"}
    assert looked.finished_runs(standing) == whole

    del saved["runs"][chosen.relative_to(args.out).as_posix()]  # and a new machine
    ledger.write_text(json.dumps(saved))
    shutil.rmtree(args.out)
    looked = Study(args, study, Ledger(ledger, args.out))
    standing = looked.status()
    assert sorted(standing[0]["grid"]) == ["not needed", "not started"]
    assert [r for r in looked.finished_runs(standing) if r["variant"] == "logit-adjusted CE"] == []
    started, _, run = fake_runs(jobs=2)
    assert looked.runs(run, jobs=2) == whole and [folder for _, _, folder in started] == [chosen]


def test_a_ledger_serves_one_study_and_cannot_give_a_second_stage_its_checkpoint(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import Ledger, Study

    args, study = animal_lt_study(tmp_path / "out")
    ledger = tmp_path / "ledger.json"
    Study(args, study, Ledger(ledger, args.out)).runs(fake_runs(jobs=2)[2], jobs=2)
    for other in (animal_lt_study(args.out, config="other.yaml")[0],
                  argparse.Namespace(**{**vars(args), "seeds": [1, 0]}),
                  argparse.Namespace(**{**vars(args), "extra": ["train.epochs=3"]})):
        with pytest.raises(ValueError, match="holds another study's runs .*give this study its own --ledger"):
            Study(other, study, Ledger(ledger, other.out))

    # cRT starts from CE's checkpoints, which the ledger does not keep: refused at once, naming every CE run
    import shutil

    shutil.rmtree(args.out)
    saved = json.loads(ledger.read_text())
    saved["runs"] = {key: record for key, record in saved["runs"].items() if not key.startswith("crt/")}
    ledger.write_text(json.dumps(saved))
    started, _, run = fake_runs(jobs=2)
    ce = [key for key in saved["runs"] if key.startswith("ce/")]
    with pytest.raises(ValueError, match=f"{', '.join(ce)} .* must be trained again: a second stage starts"):
        Study(args, study, Ledger(ledger, args.out)).runs(run, jobs=2)
    assert started == [] and len(ce) == 2
    # a cRT run with an epoch done resumes from its own checkpoint: only the other seed's CE run is named
    crt_seed0 = Study(args, study, Ledger(ledger, args.out)).folders["cRT"] / "seed0" / CHECKPOINT_DIR
    crt_seed0.mkdir(parents=True)
    (crt_seed0 / LATEST).write_text("epoch_0001")
    with pytest.raises(ValueError, match=f"^{ce[1]} \\(in .* must be trained again"):
        Study(args, study, Ledger(ledger, args.out)).runs(run, jobs=2)
    assert started == [] and ce[1].endswith("seed1")

    saved["chosen"]["logit-adjusted CE"] = {"loss.logit_adjust_tau": 0.7}  # a grid that changed since
    ledger.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="logit-adjusted CE's chosen weights .* are not in its grid"):
        Study(args, study, Ledger(ledger, args.out))


def test_a_failed_run_keeps_the_runs_under_way_in_the_ledger(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import VARIANTS, Ledger, Study

    args = argparse.Namespace(seeds=[0], out=tmp_path / "out", config="c.yaml", extra=[])
    ledger, other_started = tmp_path / "ledger.json", threading.Event()
    _, _, run = fake_runs(jobs=2)

    def fail_ce(settings: dict, seed: int, folder: Path) -> dict:
        if folder.parent.parent.name == "ce":  # fails while a logit-adjusted CE run is under way
            assert other_started.wait(10)
            raise RuntimeError("CE failed")
        other_started.set()
        time.sleep(0.3)
        return run(settings, seed, folder)

    with pytest.raises(RuntimeError, match="CE failed"):
        Study(args, [VARIANTS["CE"], VARIANTS["logit-adjusted CE"]], Ledger(ledger, args.out)).runs(fail_ce, jobs=2)
    [kept] = json.loads(ledger.read_text())["runs"]
    assert kept.startswith("logit_adjusted_ce/loss_logit_adjust_tau___0_5")


def test_ablation_crt_starts_from_the_chosen_ce_run_of_its_own_seed(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study

    started, finished, run = fake_runs(jobs=2)
    args = argparse.Namespace(seeds=[3, 1, 4], out=tmp_path, config="c.yaml", extra=[])
    study = Study(args, [VARIANTS[name] for name in STUDIES["animal_lt"]])
    runs = study.runs(run, jobs=2)
    assert [(r["variant"], r["seed"]) for r in runs] == [(v, s) for v in STUDIES["animal_lt"] for s in (3, 1, 4)]
    # a run without the contrastive term loads one view (config_checks warns of the unused second)
    assert all((settings.get("loss.lambda_con", 0.35) == 0) == (settings.get("data.num_views") == 1)
               for settings, _, _ in started)
    crt = [(settings, seed, folder) for settings, seed, folder in started
           if settings.get("train.trainable") == "classifier"]
    assert sorted(seed for _, seed, _ in crt) == [1, 3, 4]
    for settings, seed, folder in crt:
        ce_run = study.folders["CE"] / f"seed{seed}"
        assert settings["train.init_from"] == str(ce_run / "checkpoints")
        assert settings["data.sampler"] == "class_balanced" and settings["loss.lambda_bdc"] == 0
        assert finished.index(ce_run) < finished.index(folder)  # started after its first stage ended
    # each variant's chosen point is its grid's best on the first seed, and every seed uses it
    for name in STUDIES["animal_lt"]:
        grid = [(fake_score(folder), folder) for _, seed, folder in started
                if seed == 3 and folder.parent.parent.name == variant_slug(name)]
        assert study.folders[name] / "seed3" == max(grid)[1]
        assert all(folder.parent == study.folders[name] for _, seed, folder in started
                   if seed != 3 and folder.parent.parent.name == variant_slug(name))


def test_a_variant_of_another_runs_at_its_chosen_weights_with_one_term_changed(tmp_path: Path) -> None:
    """JRCL without the binary head's CE waits for JRCL's grid, then runs on every seed at the
    weights JRCL chose with λ_bin = 0 alone changed; another choice gives other runs; and the
    paired table names λ_bin as all that differs, but names every weight where a pair differs
    in more (JRCL + logit adjustment, at the config's weights, against JRCL)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study, differences, grid_points

    started, finished, run = fake_runs(jobs=2)
    done_at_start: dict[Path, list[Path]] = {}

    def run_noting(settings: dict, seed: int, folder: Path) -> dict:
        done_at_start[folder] = list(finished)
        return run(settings, seed, folder)

    args = argparse.Namespace(seeds=[2, 0, 1], out=tmp_path, config="c.yaml", extra=[])
    study = Study(args, [VARIANTS[name] for name in STUDIES["animal_lt"]])
    study.runs(run_noting, jobs=2)
    jrcl, jrcl_la, no_bin = (VARIANTS[name] for name in ("JRCL", "JRCL + logit adjustment", "JRCL, λ_bin = 0"))
    jrcl_grid = [folder for _, seed, folder in started if seed == 2 and folder.parent.parent.name == variant_slug("JRCL")]
    no_bin_runs = [(settings, seed, folder) for settings, seed, folder in started
                   if folder.parent.parent.name == variant_slug(no_bin.name)]
    assert len(jrcl_grid) == 4 and sorted(seed for _, seed, _ in no_bin_runs) == [0, 1, 2]
    best = max(jrcl_grid, key=fake_score)
    chosen = study.chosen["JRCL"]
    assert study.folders["JRCL"] / "seed2" == best
    for settings, seed, folder in no_bin_runs:
        assert settings == chosen | {"loss.lambda_bin": 0} and folder == study.folders[no_bin.name] / f"seed{seed}"
        assert set(jrcl_grid) <= set(done_at_start[folder])  # started once JRCL's grid had chosen
    # JRCL choosing other weights gives JRCL, λ_bin = 0 other runs
    other = next(point for point in grid_points(jrcl) if point != study.chosen["JRCL"])
    before = study.folder(no_bin, {})
    study.chosen["JRCL"] = other
    assert study.folder(no_bin, {}) != before
    study.chosen["JRCL"] = chosen

    config = {"loss": {"lambda_bin": 1.0, "lambda_con": 0.35, "lambda_bdc": 1.0, "logit_adjust_tau": 0.0}}
    assert differences(study.weights(jrcl), study.weights(no_bin), config) == "lambda_bin 1.0 vs 0"
    expected = [f"logit_adjust_tau {study.chosen[jrcl_la.name]['loss.logit_adjust_tau']} vs 0.0"]
    expected += [f"{key.split('.')[1]} {config['loss'][key.split('.')[1]]} vs {value}" for key, value in chosen.items()
                 if value != config["loss"][key.split(".")[1]]]
    assert differences(study.weights(jrcl_la), study.weights(jrcl), config) == ", ".join(expected)


def test_an_ablation_whose_runs_cannot_start_says_so(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import VARIANTS, Study

    args = argparse.Namespace(seeds=[0, 1], out=tmp_path, config="c.yaml", extra=[])
    started, _, run = fake_runs(jobs=2)
    with pytest.raises(ValueError, match="cRT cannot start: a second stage needs its first stage"):
        Study(args, [VARIANTS["cRT"]]).runs(run, jobs=2)  # cRT without CE: it would wait forever
    assert started == []


@pytest.mark.parametrize("study_name", ["animal_lt", "mnist_lt"])
def test_ablation_runs_whole_variants_in_the_study_order(tmp_path: Path, study_name: str) -> None:
    """One at a time, a variant's other seeds start before the next variant's grid: an
    ablation stopped early holds whole variants, the study's first ones."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study, grid_points

    started, _, run = fake_runs(jobs=1)
    args = argparse.Namespace(seeds=[2, 0, 1], out=tmp_path, config="c.yaml", extra=[])
    Study(args, [VARIANTS[name] for name in STUDIES[study_name]]).runs(run, jobs=1)
    names = {variant_slug(name): name for name in STUDIES[study_name]}
    order = [(names[folder.parent.parent.name], seed) for _, seed, folder in started]
    assert order == [(name, seed) for name in STUDIES[study_name]
                     for seed in [2] * len(grid_points(VARIANTS[name])) + [0, 1]]


# Each baseline of animal-lt as the best, with the questions whose b it is (shown once, not twice)
ASKED_OF_BEST = {"CE": [("CE + O2A", "O2A, added to CE")],
                 "logit-adjusted CE": [("logit-adjusted CE + BDC", "BDC and its binary head, added to logit-adjusted CE")],
                 "cRT": []}


@pytest.mark.parametrize("best_on_val", list(ASKED_OF_BEST))
def test_ablation_pairs_by_seed_against_the_baseline_best_on_validation(best_on_val: str) -> None:
    """Fresh random scores: the baseline is chosen on validation even when another is best
    on test, each pair shows once, and each difference is the mean of per-seed differences
    (brute force)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import PAIRED, STUDIES, VARIANTS, comparisons

    rng = np.random.default_rng()
    study = [VARIANTS[name] for name in STUDIES["animal_lt"]]
    seeds = [0, 1, 2, 3, 4]
    runs = [{"variant": v.name, "seed": s, "val": {"balanced_accuracy": float(rng.uniform(0.5, 0.6))},
             "test": {key: float(rng.uniform(0.4, 0.9)) for key, _ in PAIRED}} for v in study for s in seeds]
    for r in runs:
        if r["variant"] == best_on_val:
            r["val"]["balanced_accuracy"] += 0.1
    for r in runs:  # the other baselines are best on test: test scores must not choose
        if r["variant"] in {"CE", "logit-adjusted CE", "cRT"} - {best_on_val}:
            r["test"]["balanced_accuracy"] = 0.95
    runs[-1]["test"]["normal_vs_abnormal_accuracy"] = None  # a missing metric drops that seed only
    compared = comparisons(runs, study)
    assert compared["baseline"] == best_on_val
    rows = {(row["a"], row["b"]): row for row in compared["rows"]}
    # 7 variants against the best baseline and the 5 questions, less those whose b it is
    assert len(compared["rows"]) == len(rows) == 7 + 5 - len(ASKED_OF_BEST[best_on_val])
    assert {a for a, b in rows if b == best_on_val} == {v.name for v in study} - {best_on_val}
    for a, why in ASKED_OF_BEST[best_on_val]:
        assert rows[a, best_on_val]["why"] == f"{why} (the best baseline)"
    assert ("logit-adjusted CE + BDC", "logit-adjusted CE") in rows and ("JRCL", "CE + O2A") in rows
    test = {(r["variant"], r["seed"]): r["test"] for r in runs}
    for (a, b), row in rows.items():
        for key, _ in PAIRED:
            diffs = [test[a, s][key] - test[b, s][key] for s in seeds
                     if test[a, s][key] is not None and test[b, s][key] is not None]
            half = stats.t.ppf(0.975, len(diffs) - 1) * np.std(diffs, ddof=1) / math.sqrt(len(diffs))
            assert row[key]["mean"] == pytest.approx(sum(diffs) / len(diffs))
            assert row[key]["ci95"] == pytest.approx(half)


def test_a_question_that_asks_the_best_baseline_minus_a_variant_is_its_only_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No question today has a baseline as its a; one that did must not show its pair twice,
    once each way round."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import ablation

    question = ("logit-adjusted CE", "CE + O2A", "logit adjustment instead of O2A")
    monkeypatch.setattr(ablation, "QUESTIONS", [*ablation.QUESTIONS, question])
    rng = np.random.default_rng()
    runs = [{"variant": name, "seed": s, "test": {key: float(rng.uniform()) for key, _ in ablation.PAIRED},
             "val": {"balanced_accuracy": 0.9 if name == "logit-adjusted CE" else float(rng.uniform(0.5, 0.8))}}
            for name in ablation.STUDIES["animal_lt"] for s in (0, 1, 2)]
    compared = ablation.comparisons(runs, [ablation.VARIANTS[name] for name in ablation.STUDIES["animal_lt"]])
    pairs = [(row["a"], row["b"]) for row in compared["rows"]]
    assert question[:2] in pairs and question[1::-1] not in pairs and len(pairs) == len(set(pairs)) == 7 + 6 - 2


def test_ablation_status_reads_where_each_variant_stands_without_running(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study, grid_points

    args = argparse.Namespace(seeds=[0, 1, 2], out=tmp_path, config="c.yaml", extra=[])
    study = Study(args, [VARIANTS[name] for name in STUDIES["animal_lt"]])
    scores = np.random.default_rng().permutation(4) / 10 + 0.5  # fresh validation scores, all different

    def finish(run: Path, score: float) -> None:
        run.mkdir(parents=True)
        scores = dict.fromkeys(("balanced_accuracy", "top1", "macro_f1", "normal_vs_abnormal_accuracy"), 0.5)
        (run / "results.json").write_text(json.dumps(
            {**scores, "shot_accuracy": {}, "selection": {"best_value": float(score), "best_epoch": 3}}))

    ce = study.folder(VARIANTS["CE"], {})
    finish(ce / "seed0", scores[0])
    la = [study.folder(VARIANTS["logit-adjusted CE"], point) for point in grid_points(VARIANTS["logit-adjusted CE"])]
    finish(la[0] / "seed0", scores[1])
    finish(la[1] / "seed0", scores[2])
    best = la[int(scores[2] > scores[1])]
    (best / "seed1").mkdir()
    (best / "seed1" / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3}\n')
    finish(best / "seed2", scores[3])
    o2a = study.folder(VARIANTS["CE + O2A"], {"loss.lambda_con": 0.1})
    finish(o2a / "seed0", scores[3])

    rows = {row["variant"]: row for row in study.status()}
    assert rows["CE"]["grid"] == ["done"] and rows["CE"]["seeds"] == {1: "not started", 2: "not started"}
    assert rows["logit-adjusted CE"]["chosen"] == {"loss.logit_adjust_tau": 1.0 if best == la[1] else 0.5}
    assert rows["logit-adjusted CE"]["seeds"] == {1: "at epoch 3", 2: "done"}
    assert rows["cRT"]["grid"] == ["not started"]  # planned: its first stage's grid is done
    assert rows["CE + O2A"]["grid"] == ["done", "not started"] and rows["CE + O2A"]["chosen"] is None
    assert rows["CE + O2A"]["seeds"] == {} and rows["JRCL"]["grid"] == ["not started"] * 4


def test_ablation_status_reports_the_variants_done_on_every_seed(tmp_path: Path) -> None:
    """--status writes both tables for the variants done on all seeds, and only for them, and
    leaves --json (the finished ablation's report) alone."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study, grid_points

    # a real config: the paired table names the settings in which a pair differs, with the config's values
    args = argparse.Namespace(seeds=[0, 1, 2], out=tmp_path / "out", config="configs/animal_lt.yaml", extra=[])
    study, rng = Study(args, [VARIANTS[name] for name in STUDIES["animal_lt"]]), np.random.default_rng()
    test: dict[tuple[str, int], dict] = {}

    def finish(name: str, folder: Path, seed: int, val: float) -> None:
        scores = {key: float(rng.uniform(0.5, 1)) for key in
                  ("balanced_accuracy", "top1", "macro_f1", "normal_vs_abnormal_accuracy", "many", "medium", "few")}
        test[name, seed] = scores
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "results.json").write_text(json.dumps(
            {**scores, "shot_accuracy": {k: scores[k] for k in ("many", "medium", "few")},
             "selection": {"best_value": val, "best_epoch": 7}}))

    def status() -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "ablation.py"), "--config", args.config,
                               "--variants", "animal_lt", "--seeds", "0", "1", "2", "--out", str(args.out),
                               "--status", "--json", str(tmp_path / "docs.json")],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert done.returncode == 0, done.stderr
        return done

    for name in ("logit-adjusted CE", "logit-adjusted CE + BDC"):
        points = [study.folder(VARIANTS[name], point) for point in grid_points(VARIANTS[name])]
        for i, folder in enumerate(points):
            finish(name, folder, 0, 0.5 + 0.1 * i)  # the last point is chosen
        for seed in (1, 2):
            finish(name, points[-1], seed, 0.5)
        if name == "logit-adjusted CE":  # the baseline alone: its table, and no empty pair table
            status()
            assert json.loads((args.out / "partial.json").read_text())["paired"]["rows"] == []
            assert (args.out / "partial.md").read_text().count("|\n") == 2 + 1  # header, rule, one variant
    finish("CE", study.folder(VARIANTS["CE"], {}), 0, 0.9)  # CE's other seeds have not run: left out
    done = status()
    assert not (tmp_path / "docs.json").exists()
    partial = json.loads((args.out / "partial.json").read_text())
    assert not partial["complete"]
    assert list(partial["summary"]) == ["logit-adjusted CE", "logit-adjusted CE + BDC"]
    assert partial["paired"]["baseline"] == "logit-adjusted CE"
    for name in partial["summary"]:
        chosen = [test[name, 0]] + [test[name, seed] for seed in (1, 2)]  # seed 0: the chosen point's
        assert partial["summary"][name]["few"]["mean"] == pytest.approx(np.mean([t["few"] for t in chosen]))
    # the BDC question's b is the best baseline: one row answers both, and says so
    [bdc] = partial["paired"]["rows"]
    assert bdc["why"] == "BDC and its binary head, added to logit-adjusted CE (the best baseline)"
    assert bdc["differs"] == "lambda_bin 1.0 vs 0, lambda_bdc 1.0 vs 0"  # animal_lt.yaml's values, and the variant's
    assert bdc["normal_vs_abnormal_accuracy"]["per_seed"] == pytest.approx(
        [test["logit-adjusted CE + BDC", s]["normal_vs_abnormal_accuracy"]
         - test["logit-adjusted CE", s]["normal_vs_abnormal_accuracy"] for s in (0, 1, 2)])
    assert "2 of 8 variants" in (args.out / "partial.md").read_text()
    # the figures name the machine and the commit, on screen and in the JSON
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    assert partial["commit"].startswith(head.strip()) and partial["machine"].endswith(f"{os.cpu_count()} cores")
    assert f"at commit {partial['commit']}" in " ".join(done.stdout.split())  # rich wraps lines


def test_ablation_curves_draw_every_first_seed_run_with_metrics(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from ablation import STUDIES, VARIANTS, Study, grid_points, plot_curves

    args = argparse.Namespace(seeds=[0, 1], out=tmp_path / "out", config="c.yaml", extra=[])
    study = Study(args, [VARIANTS[name] for name in STUDIES["animal_lt"]])
    assert plot_curves(study.status(), tmp_path / "none.png") == 0 and not (tmp_path / "none.png").exists()
    rng = np.random.default_rng()
    drawn = [(VARIANTS["CE"], {}), *((VARIANTS["JRCL"], point) for point in grid_points(VARIANTS["JRCL"])[:3])]
    for variant, point in drawn:
        run = study.folder(variant, point) / "seed0"
        run.mkdir(parents=True)
        epochs = int(rng.integers(2, 9))  # unfinished runs are drawn too
        (run / "metrics.jsonl").write_text("".join(
            json.dumps({"epoch": e, "val_balanced_accuracy": float(rng.uniform())}) + "\n" for e in range(1, epochs)))
    (study.folder(VARIANTS["JRCL"], grid_points(VARIANTS["JRCL"])[0]) / "seed1").mkdir()  # not the first seed: not drawn
    assert plot_curves(study.status(), tmp_path / "curves.png") == len(drawn)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
