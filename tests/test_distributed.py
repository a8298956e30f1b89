"""Data-parallel training: the global contrastive batch, sharded evaluation, and real
2-rank runs under the deepspeed launcher (CPU, gloo) against 1-rank runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import (
    REPO,
    TINY_OVERRIDES,
    WORLD,
    dist_config,
    equivalence_config,
    launch,
    launcher_cmd,
    read_jsonl,
    run_cli,
    run_env,
    tiny_config,
)

from jrcl_fast.runtime import free_port

# ---------------------------------------------------------------- 2 processes, no launcher

def problem(seed=0, per_rank=6, views=2, dim=8, classes=4):
    """A tiny 'model' (linear map + prototypes) and a global batch of inputs."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, dim, dtype=torch.float64, generator=g)
    protos = torch.randn(classes, dim, dtype=torch.float64, generator=g)
    x = torch.randn(WORLD, views * per_rank, dim, dtype=torch.float64, generator=g)  # rank-major
    labels = torch.randint(0, classes, (WORLD, per_rank), generator=g).repeat(1, views)
    return weight, protos, x, labels


def naive_one_to_all_supcon(features, labels, prototypes, temperature, class_average, backend):
    """The common bug: gather without gradient, own rows put back, no world-size factor."""
    from jrcl_fast.kernels.specs import O2AArgs
    from jrcl_fast.losses.contrastive import mean_over_anchors_with_positives, o2a_per_anchor
    from jrcl_fast.runtime import gather_rows

    rank, n = dist.get_rank(), features.shape[0]
    keys = gather_rows(features.detach())
    keys = torch.cat([keys[: rank * n], features, keys[(rank + 1) * n:], prototypes])
    key_labels = torch.cat([gather_rows(labels), torch.arange(prototypes.shape[0])])
    loss, num_pos = o2a_per_anchor(O2AArgs(features, labels, keys, key_labels, rank * n, temperature, class_average),
                                   backend)
    count = (num_pos > 0).sum()
    dist.all_reduce(count)
    return mean_over_anchors_with_positives(loss, num_pos, count)


def worker(rank, port, out_dir):
    from jrcl_fast.data.sampling import eval_indices
    from jrcl_fast.losses.contrastive import global_one_to_all_supcon
    from jrcl_fast.runtime import gather_shards

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    weight, protos, x, labels = problem()
    grads = {}
    for name, fn in (("global", global_one_to_all_supcon), ("naive", naive_one_to_all_supcon)):
        w, p = weight.clone().requires_grad_(), protos.clone().requires_grad_()
        loss = fn(F.normalize(x[rank] @ w, dim=1), labels[rank], F.normalize(p, dim=1), 0.1, True, "torch")
        loss.backward()
        # DeepSpeed's gradient averaging over ranks
        for t in (w.grad, p.grad):
            dist.all_reduce(t)
            t /= WORLD
        grads[name] = (w.grad, p.grad, loss.detach())

    # evaluation shards: each rank predicts its eval_indices; gathered in sample order
    n = 11
    mine = eval_indices(n, rank, WORLD)
    positions = [eval_indices(n, r, WORLD) for r in range(WORLD)]
    gathered = gather_shards(mine * 10, positions)
    try:
        gather_shards(mine, [np.arange(n), np.arange(n)])  # a sample counted twice must be refused
        refused = False
    except RuntimeError:
        refused = True
    torch.save({"grads": grads, "gathered": gathered, "refused": refused}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_global_batch_gradients_equal_one_process_and_naive_gather_does_not(tmp_path):
    from jrcl_fast.losses.contrastive import one_to_all_supcon
    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=WORLD)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]

    weight, protos, x, labels = problem()
    w, p = weight.clone().requires_grad_(), protos.clone().requires_grad_()
    # one process on the concatenated batch (the row order does not change the loss)
    loss = one_to_all_supcon(F.normalize(x.reshape(-1, x.shape[-1]) @ w, dim=1), labels.reshape(-1),
                             F.normalize(p, dim=1), 0.1, True, "torch")
    loss.backward()

    for result in results:
        gw, gp, _ = result["grads"]["global"]
        torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gp, p.grad, rtol=1e-10, atol=1e-12)
        nw, _, _ = result["grads"]["naive"]
        assert not torch.allclose(nw, w.grad, rtol=1e-3), "the naive gather must fail the same check"
    # the mean over ranks of the returned loss is the global loss (what the trainer logs)
    torch.testing.assert_close(sum(r["grads"]["global"][2] for r in results) / WORLD, loss.detach())

    for result in results:  # every test sample exactly once, in sample order
        np.testing.assert_array_equal(result["gathered"], np.arange(11) * 10)
        assert result["refused"]


# ---------------------------------------------------------------- a dead peer, simulated in this process

@pytest.fixture
def rank_1_of_2(monkeypatch):
    """The environment the launcher gives rank 1 of a 2-rank job."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")


def raise_(err):
    raise err


LOST_PEER = [dist.DistError("Connection closed by peer"),
             RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")]


@pytest.mark.parametrize("err", LOST_PEER)
def test_a_failed_collective_becomes_one_line(rank_1_of_2, err):
    from jrcl_fast.errors import RankFailure
    from jrcl_fast.runtime import collective_failures

    message = (r"^rank 1 of 2: a collective with the other ranks failed: another rank closed its connection, so it "
               r"died or was stopped .*Connection closed")
    with pytest.raises(RankFailure, match=message), collective_failures():
        raise err


def test_a_timed_out_collective_says_so_without_claiming_a_death(rank_1_of_2):
    from jrcl_fast.errors import RankFailure
    from jrcl_fast.runtime import collective_failures

    message = (r"^rank 1 of 2: a collective with the other ranks waited longer than train.collective_timeout_s: "
               r"another rank hangs, or died without closing its connection")
    with pytest.raises(RankFailure, match=message), collective_failures():
        raise RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation")


def test_other_errors_pass_unchanged(rank_1_of_2, monkeypatch):
    from jrcl_fast.runtime import collective_failures

    unrelated = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError) as caught, collective_failures():
        raise unrelated
    assert caught.value is unrelated
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no other rank to blame
    with pytest.raises(dist.DistError), collective_failures():
        raise LOST_PEER[0]


def test_evaluation_gather_reports_a_dead_rank(rank_1_of_2, monkeypatch):
    from jrcl_fast import runtime
    from jrcl_fast.errors import RankFailure

    monkeypatch.setattr(runtime, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", lambda *_: raise_(LOST_PEER[0]))
    with pytest.raises(RankFailure, match="^rank 1 of 2"):
        runtime.gather_shards(np.zeros(3), [np.arange(3), np.arange(3, 6)])


def test_engine_start_up_reports_a_dead_rank(rank_1_of_2, monkeypatch, tmp_path, digits_root):
    """`train` as a whole is wrapped: start-up here, and with it resume, the loop and
    the checkpoint barriers."""
    from rich.console import Console

    from jrcl_fast.config import load_config
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.engine import run_setup, trainer
    from jrcl_fast.errors import RankFailure
    from jrcl_fast.runtime import Ranks

    # CPU ranks, said explicitly: on a machine with one GPU, rank 1 would otherwise be refused
    cfg = load_config(tiny_config(tmp_path, digits_root, train={**TINY_OVERRIDES["train"], "device": "cpu"}))
    monkeypatch.setattr(run_setup, "build_engine", lambda *_: raise_(LOST_PEER[0]))  # as deepspeed.initialize's broadcast
    with pytest.raises(RankFailure, match="^rank 1 of 2"):
        trainer.train(cfg, load_dataset(cfg.data), False, False, Console(quiet=True), Ranks(1, 2, 1))


# ---------------------------------------------------------------- real runs (CLI, launcher)

@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, digits_root):
    tmp = tmp_path_factory.mktemp("two_rank")
    config = equivalence_config(tmp, "straight", digits_root)
    port = free_port()
    done = launch(config, port=port)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # DeepSpeed's shared-memory all-reduce stays off: not compiled, no /dev/shm segment
    # (named after the job's port) left behind.
    assert "shm_comm" not in done.stdout + done.stderr
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return config, done


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_twice_the_batch(two_rank_run, tmp_path, digits_root):
    config, done = two_rank_run
    run = config.parent / "run"
    assert "DeepSpeed, 2 rank(s), fp32, ZeRO stage 0" in done.stdout
    one = equivalence_config(tmp_path, "one", digits_root, batch_size=32)
    single = run_cli("train", "--config", str(one))
    assert single.returncode == 0, single.stderr
    assert "local engine" in single.stdout

    two_steps, one_steps = read_jsonl(run / "steps.jsonl"), read_jsonl(one.parent / "run" / "steps.jsonl")
    assert len(two_steps) == len(one_steps) == 20
    for term in ("loss_total", "loss_contrastive", "loss_ce"):
        a, b = np.array([s[term] for s in two_steps]), np.array([s[term] for s in one_steps])
        assert np.abs(a - b).max() / np.abs(b).max() < 1e-4, (term, a, b)

    # rank 0 wrote the results; every test image counted once
    results = json.loads((run / "results.json").read_text())
    assert results["num_test_images"] == sum(r["test_count"] for r in results["per_class"])
    single_results = json.loads((one.parent / "run" / "results.json").read_text())
    assert results["num_test_images"] == single_results["num_test_images"]

    # jrcl-fast eval reads the DeepSpeed checkpoint and reproduces the run's results
    again = run_cli("eval", "--checkpoint", str(run / "checkpoints"), "--output-dir", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results


@pytest.mark.slow
def test_killed_launcher_job_resumes_on_the_same_trajectory(two_rank_run, tmp_path, digits_root):
    config, _ = two_rank_run
    straight = config.parent / "run"
    killed = equivalence_config(tmp_path, "killed", digits_root)
    steps = killed.parent / "run" / "steps.jsonl"
    proc = subprocess.Popen(launcher_cmd(killed), cwd=REPO, env=run_env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if steps.exists() and len(steps.read_text().splitlines()) >= 13:  # in epoch 2, after its checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the job finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks
    proc.wait()
    ckpt = killed.parent / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "epoch_0001"

    resumed = launch(killed, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Resuming" in resumed.stdout
    assert read_jsonl(steps) == read_jsonl(straight / "steps.jsonl")
    assert sorted(p.name for p in ckpt.iterdir()) == ["epoch_0002", "latest"]
    assert json.loads((killed.parent / "run" / "results.json").read_text()) == json.loads(
        (straight / "results.json").read_text())


@pytest.mark.slow
def test_two_ranks_select_and_stop_early_on_one_validation_score(tmp_path, mnist_root):
    """Selection under data parallelism. Each rank evaluates its shard of the validation split
    and the predictions are gathered into one score; were a rank to choose on another score, the
    ranks would stop at different epochs (the job fails or hangs) or report their test shards with
    different epochs' weights.
    A constant, high learning rate with strong weight decay makes the validation curve noisy,
    so patience 1 stops the run within a few epochs, on an epoch that is not the selected one."""
    config = dist_config(tmp_path, "select", base="mnist_lt", data_root=mnist_root, data={"image_size": 8},
                         optim={"lr": 0.1, "min_lr": 0.1, "weight_decay": 0.2},
                         train={"epochs": 8, "batch_size": 32, "select_on": "val_balanced_accuracy",
                                "early_stop_patience": 1})
    done = launch(config, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = config.parent / "run"
    results = json.loads((run / "results.json").read_text())
    selection = results["selection"]
    curve = [m["val_balanced_accuracy"] for m in read_jsonl(run / "metrics.jsonl")]
    assert selection["stopped_early"], f"the curve {curve} rose for 8 epochs; make it noisier"
    assert len(curve) == selection["epochs_trained"] == selection["best_epoch"] + 1
    assert selection["best_epoch"] == 1 + int(np.argmax(curve)) and selection["best_value"] == max(curve)
    last = f"epoch_{selection['epochs_trained']:04d}"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"epoch_{selection['best_epoch']:04d}", last, "latest"]
    # one process on the whole test split, with the selected epoch's weights, reports what the ranks did
    again = run_cli("eval", "--checkpoint", str(run / "checkpoints"), "--output-dir", str(tmp_path / "eval"))
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_in_bf16_with_accumulation_and_clipping(tmp_path, digits_root, stage):
    """ResNet-32: bf16 on a CPU without bf16 instructions is 18-73x slower (docs/PRECISION.md)."""
    config = dist_config(tmp_path, f"zero{stage}", data_root=digits_root,
                         ds={"bf16": {"enabled": True}, "zero_optimization": {"stage": stage},
                             "gradient_clipping": 1.0},
                         train={"epochs": 1, "gradient_accumulation_steps": 2},
                         model={"norm": "batch", "backbone": "resnet32"})
    done = launch(config)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"DeepSpeed, 2 rank(s), bf16, ZeRO stage {stage}" in done.stdout
    assert "global batch 64 images" in done.stdout
    (metrics,) = read_jsonl(config.parent / "run" / "metrics.jsonl")
    assert np.isfinite(metrics["loss_total"])


def test_batch_keys_of_the_deepspeed_config_must_agree(tmp_path, digits_root):
    config = dist_config(tmp_path, "mismatch", data_root=digits_root, ds={"train_micro_batch_size_per_gpu": 8})
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 2
    assert "train_micro_batch_size_per_gpu=8 disagrees with the YAML config" in done.stderr


def test_fp16_on_cpu_ranks_without_fp16_is_a_clear_error(tmp_path, digits_root):
    from jrcl_fast.engine.backends import cpu_has_fp16

    if cpu_has_fp16():
        pytest.skip("this CPU runs fp16 (oneDNN), so DeepSpeed's CPU backend takes it")
    config = dist_config(tmp_path, "fp16", data_root=digits_root,
                         ds={"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}})
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 2 and "DeepSpeed's CPU backend has no fp16 on this CPU" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cpu_has_fp16", [False, True])
def test_fp16_on_cpu_ranks_is_refused_exactly_where_the_cpu_lacks_it(monkeypatch, cpu_has_fp16):
    """Both CPUs emulated: the test above runs only on a CPU without fp16, and CPUs with
    AVX-512 FP16 or AMX (the Intel Xeon VMs) have it. A GPU rank never asks the CPU."""
    from jrcl_fast.engine import backends
    from jrcl_fast.errors import UserError

    monkeypatch.setattr(backends, "cpu_has_fp16", lambda: cpu_has_fp16)
    ds = {"fp16": {"enabled": True}, "zero_optimization": {"stage": 1}}
    backends.check_precision(ds, "ds.json", 1, torch.device("cuda"))
    if cpu_has_fp16:
        backends.check_precision(ds, "ds.json", 1, torch.device("cpu"))
    else:
        with pytest.raises(UserError, match="^ds.json: DeepSpeed's CPU backend has no fp16 on this CPU; set fp16"):
            backends.check_precision(ds, "ds.json", 1, torch.device("cpu"))


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_fp16_at_zero_stage_0_is_refused_naming_the_deepspeed_bug(tmp_path, digits_root, stage):
    """On a GPU, fp16 at ZeRO stage 0 does not learn (tests/test_gpu_rules.py shows why):
    refused in one line; stages 1 and 2 pass."""
    from jrcl_fast.config import load_config
    from jrcl_fast.engine.backends import deepspeed_config
    from jrcl_fast.errors import UserError

    cfg = load_config(dist_config(tmp_path, "fp16", data_root=digits_root,
                                  ds={"fp16": {"enabled": True}, "zero_optimization": {"stage": stage}}))
    if stage == 0:
        with pytest.raises(UserError, match="fp16 with zero_optimization.stage 0 does not learn .*#8393.*stage to 1"):
            deepspeed_config(cfg, 1, torch.device("cuda", 0))
    else:
        assert deepspeed_config(cfg, 1, torch.device("cuda", 0))[0]["fp16"]["enabled"]


def test_a_native_crash_prints_the_python_stack_it_happened_in():
    """A rank that glibc aborts (as on a corrupted heap) says where it was, not only
    the signal the launcher reports."""
    crash = ("import os, sys\nfrom jrcl_fast import cli\n"
             "def where_it_crashed(args, console): os.abort()\n"
             "cli.COMMANDS['doctor'] = where_it_crashed\nsys.exit(cli.main(['doctor']))")
    done = subprocess.run([sys.executable, "-c", crash], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == -signal.SIGABRT, done.stderr
    assert "Fatal Python error: Aborted" in done.stderr and "in where_it_crashed" in done.stderr, done.stderr


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_with_a_clear_message(tmp_path, digits_root):
    config = dist_config(tmp_path, "dead", data_root=digits_root,
                         train={"epochs": 50, "collective_timeout_s": 30})
    env = {**run_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(WORLD)}
    procs = [subprocess.Popen([sys.executable, "-m", "jrcl_fast", "train", "--config", str(config)], cwd=REPO,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(WORLD)]
    steps = config.parent / "run" / "steps.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not steps.exists():
        time.sleep(0.05)
    procs[1].kill()
    start = time.time()
    _, err = procs[0].communicate(timeout=120)
    assert time.time() - start < 60
    assert procs[0].returncode == 1, err[-3000:]
    assert "rank 0 of 2: a collective with the other ranks failed" in err, err[-3000:]
    assert "Traceback" not in err
