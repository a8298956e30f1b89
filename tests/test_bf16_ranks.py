"""bf16 at 1, 2 and 4 CPU ranks lands within seed noise of each other.

Nine digits-lt runs through DeepSpeed's bf16 engine (the shipped configs/ds_config.json:
ZeRO stage 0, gradients all-reduced in fp32), ResNet-32 with group norm, the same global batch of 64 at
every rank count, 3 seeds each. .ci/run runs this file once (first environment only):
it launches ranks, a few minutes on 2 cores.

The criterion, for the final epoch's training loss and the test balanced accuracy: the
mean over the seeds at 2 and at 4 ranks lies within TOLERANCE_SE standard errors of the
1-rank mean, the standard error of a difference of two 3-seed means, from the seed
standard deviation pooled over the three rank counts (6 degrees of freedom). Under the
hypothesis that the rank count changes nothing, each comparison fails with probability
below 1% (Student's t, 6 df: P(|t| > 4) = 0.7%). What it catches: a rank count that
changes the training (gradients summed instead of averaged, a global batch that grows
with the ranks, statistics or data that depend on the rank count, a lost bf16 path); what
it cannot see: a bf16 rounding effect smaller than seed noise over 15 steps, such as the
slow drift DeepSpeed issue 3979 reports at many ranks (docs/PRECISION.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO, tiny_config

from jrcl_fast.runtime import free_port

RANK_COUNTS = (1, 2, 4)
SEEDS = (0, 1, 2)
GLOBAL_BATCH = 64
TOLERANCE_SE = 4.0


def run_command(config: Path, ranks: int) -> list[str]:
    if ranks == 1:  # one rank needs no launcher; train.engine=deepspeed still builds DeepSpeed's engine
        return [sys.executable, "-m", "jrcl_fast", "train", "--config", str(config)]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "--module", "jrcl_fast", "train", "--config", str(config)]


def bf16_config(tmp: Path, digits_root: Path, ranks: int, seed: int) -> Path:
    folder = tmp / f"ranks{ranks}_seed{seed}"
    folder.mkdir()
    # ResNet-32 (16-64 channels), not digits-lt's ResNet-18: on a CPU without AVX-512, bf16
    # convolutions take oneDNN's reference path, 18-22x slower than fp32 at 64 channels and 73x
    # at 512 (2-core AMD EPYC, AVX2), and ResNet-18 made these nine runs take over 90 minutes.
    return tiny_config(folder, digits_root, model={"backbone": "resnet32", "norm": "group", "projection_dim": 16,
                                                   "projection_hidden_dim": 32},
                       train={"epochs": 3, "batch_size": GLOBAL_BATCH // ranks, "threads": 1, "seed": seed,
                              "engine": "deepspeed", "device": "cpu",
                              "deepspeed_config": str(REPO / "configs" / "ds_config.json")})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root):
    """The nine runs, one at a time: {(ranks, seed): (config, stdout)}. Two at a time (a
    4-rank and a 2-rank launch beside each other on 2 cores) once aborted a rank in CI."""
    tmp = tmp_path_factory.mktemp("bf16_ranks")
    env = {**os.environ, "COLUMNS": "200", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    pending = [(ranks, seed) for seed in SEEDS for ranks in RANK_COUNTS]
    running, done = {}, {}
    start = time.time()
    while pending or running:
        while pending and not running:
            key = pending.pop(0)
            config = bf16_config(tmp, digits_root, *key)
            running[key] = (config, subprocess.Popen(run_command(config, key[0]), cwd=REPO, env=env, text=True,
                                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
        for key, (config, proc) in list(running.items()):
            if proc.poll() is not None:
                out = proc.communicate()[0]
                assert proc.returncode == 0, (key, out[-3000:])
                done[key] = (config, out)
                del running[key]
        time.sleep(0.2)
    print(f"\n9 bf16 runs: {time.time() - start:.0f} s wall")
    return done


def final_scores(config: Path) -> tuple[float, float]:
    run = config.parent / "run"
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["epoch"] == 3
    return last["loss_total"], json.loads((run / "results.json").read_text())["balanced_accuracy"]


@pytest.mark.slow
def test_every_rank_count_runs_deepspeeds_bf16_engine(runs):
    """bf16 weights at every rank count (the checkpoint holds what the engine trained),
    gradients all-reduced in fp32 as the engine itself reports, the same global batch."""
    for (ranks, seed), (config, out) in runs.items():
        line = " ".join(out.split())
        assert (f"DeepSpeed, {ranks} rank(s), bf16, ZeRO stage 0, gradients accumulated in bf16, all-reduced in fp32"
                in line), (ranks, seed, line[:3000])
        assert f"global batch {GLOBAL_BATCH} images" in line
        (states,) = (config.parent / "run" / "checkpoints" / "epoch_0003").glob("mp_rank_00_model_states.pt")
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        weights = [t for name, t in module.items() if name.endswith("weight") and t.is_floating_point()]
        assert weights and {t.dtype for t in weights} == {torch.bfloat16}, (ranks, seed)


@pytest.mark.slow
def test_bf16_at_2_and_4_ranks_is_within_seed_noise_of_1_rank(runs):
    scores = {ranks: np.array([final_scores(runs[ranks, seed][0]) for seed in SEEDS]) for ranks in RANK_COUNTS}
    pooled_sd = np.sqrt(np.mean([scores[r].var(axis=0, ddof=1) for r in RANK_COUNTS], axis=0))
    se = pooled_sd * np.sqrt(2 / len(SEEDS))
    report = {ranks: {"mean": s.mean(axis=0).round(4).tolist(), "sd": s.std(axis=0, ddof=1).round(4).tolist(),
                      "min": s.min(axis=0).round(4).tolist(), "max": s.max(axis=0).round(4).tolist()}
              for ranks, s in scores.items()}
    print("\n[final loss, balanced accuracy] per rank count over seeds", SEEDS, json.dumps(report),
          "pooled sd", pooled_sd.round(4).tolist(), "tolerance", (TOLERANCE_SE * se).round(4).tolist())
    assert np.all(pooled_sd > 0), "identical scores across seeds: the seed does not reach the runs"
    for ranks in RANK_COUNTS[1:]:
        shift = np.abs(scores[ranks].mean(axis=0) - scores[1].mean(axis=0))
        assert np.all(shift <= TOLERANCE_SE * se), (ranks, shift, TOLERANCE_SE * se, report)
    # The criterion is tight enough to mean something: it is narrower than what training
    # moves (the loss falls from its first epoch by more than the tolerance).
    first = np.mean([json.loads((runs[1, s][0].parent / "run" / "metrics.jsonl").read_text().splitlines()[0])
                     ["loss_total"] for s in SEEDS])
    assert TOLERANCE_SE * se[0] < first - scores[1][:, 0].mean(), (first, scores[1][:, 0], se)
