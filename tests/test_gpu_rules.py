"""The rules a GPU machine applies, reproduced on the CPU.

The first GPU run found failures that a CPU suite could not see: bf16 BatchNorm with
fp32 running statistics, a second CPU rank picking a GPU that does not exist, a torch
without the newest collective names. Each is emulated here so that it fails on any
machine, with or without a GPU.
"""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_OVERRIDES, run_cli, tiny_config
from torch import nn

# ---------------------------------------------------------------- precision


def test_cpu_batch_norm_refuses_bf16_weights_with_fp32_statistics():
    """The rule of CUDA's BatchNorm holds on the CPU too, so the next test means the
    same on both: half weights need half statistics (fp32 weights take half input)."""
    layer = nn.BatchNorm2d(4).bfloat16()
    layer.running_mean.data, layer.running_var.data = layer.running_mean.float(), layer.running_var.float()
    with pytest.raises(RuntimeError, match="(?i)expected .*type"):
        layer(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16))
    assert nn.BatchNorm2d(4)(torch.randn(2, 4, 3, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.fixture
def gpu_present(monkeypatch):
    """A machine on which torch sees a GPU, while every tensor stays on the CPU: code
    that casts only when no GPU is present (the bug of the first GPU run) is caught."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


@pytest.fixture(scope="module")
def one_rank_deepspeed():
    """The one-rank CPU process group DeepSpeed runs in, for this module's engines (a
    second group in the same process confuses DeepSpeed's cached group handles)."""
    import torch.distributed as dist

    from jrcl_fast.runtime import Ranks, init_process_group

    saved = dict(os.environ)
    os.environ.update(DS_ACCELERATOR="cpu")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(name, None)
    init_process_group(Ranks(), torch.device("cpu"), 60)
    yield
    dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(saved)


def engine_as_on_a_gpu_machine(cfg, monkeypatch):
    """build_engine's engine and description for the model of `cfg` (seed 0), on the CPU
    of a machine where torch sees a GPU."""
    from jrcl_fast.engine.backends import build_engine
    from jrcl_fast.engine.optim import build_optimizer, build_scheduler
    from jrcl_fast.models import JRCLNet
    from jrcl_fast.runtime import Ranks

    torch.manual_seed(0)
    model = JRCLNet(cfg.model, 10)
    optimizer = build_optimizer(cfg.optim, model)
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        return build_engine(cfg, Ranks(), torch.device("cpu"), model, optimizer,
                            build_scheduler(cfg.optim, optimizer, 100, 1))


def assert_each_layer_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Every floating parameter and buffer (BatchNorm's statistics too) is in `dtype`."""
    for name, layer in module.named_modules():
        dtypes = {t.dtype for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))
                  if t.is_floating_point()}
        assert dtypes <= {dtype}, (name, dtypes)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_bf16_deepspeed_engine_gives_each_layer_one_dtype_and_trains(tmp_path, digits_root, monkeypatch, norm,
                                                                     one_rank_deepspeed):
    """The real engine set-up of a GPU run (DeepSpeed, the default bf16 config), one
    optimizer step: every layer's buffers share its parameters' dtype, the forward and
    backward pass run, and the weights move."""
    from jrcl_fast.config import load_config

    cfg = load_config(tiny_config(tmp_path, digits_root, train={**TINY_OVERRIDES["train"], "engine": "deepspeed"},
                                  model={"norm": norm, "projection_dim": 16, "projection_hidden_dim": 32}))
    assert cfg.train.deepspeed_config == str(REPO / "configs" / "ds_config.json")  # the shipped default, bf16
    engine, description = engine_as_on_a_gpu_machine(cfg, monkeypatch)
    assert "bf16" in description
    assert_each_layer_in(engine.module, torch.bfloat16)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    images = torch.randn(8, 3, 8, 8, dtype=torch.bfloat16)
    out = engine(images)
    loss = nn.functional.cross_entropy(out.logits.float(), torch.arange(8) % 10) + out.features.float().sum()
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))


class JoiningTheGroup(Exception):
    """Where a rank of a several-rank job would wait for the others: the test stops there."""


@pytest.mark.parametrize("precision, bf16_seconds, ranks", [
    ("bf16", 3.1, (0, 1, 0)), ("bf16", 2.9, (0, 1, 0)), ("fp32", 20.0, (0, 1, 0)),
    ("bf16", 20.0, (0, 2, 0)), ("bf16", 20.0, (1, 2, 1))])
def test_bf16_on_cpu_ranks_that_run_it_slowly_is_warned_at_start_up(tmp_path, digits_root, monkeypatch, precision,
                                                                    bf16_seconds, ranks, one_rank_deepspeed):
    """Where bf16 convolutions take over 3x fp32's time (an AVX2 CPU: 18-73x), a run whose
    DeepSpeed config asks for bf16 on CPU ranks is warned as the engine is built, once (by
    rank 0), with the file and the fp32 settings named (the local engine only for one
    process); fp32, or a CPU that runs bf16 well, is not warned, and an fp32 run or a rank
    other than 0 does not measure. The timing is emulated; that it runs on one thread is
    test_doctor.py's."""
    import warnings

    from jrcl_fast.config import load_config
    from jrcl_fast.engine import backends, cpu_bf16
    from jrcl_fast.engine.optim import build_optimizer, build_scheduler
    from jrcl_fast.errors import ConfigWarning
    from jrcl_fast.models import JRCLNet
    from jrcl_fast.runtime import Ranks

    timed = []
    monkeypatch.setattr(cpu_bf16, "conv_seconds", lambda dtype: timed.append(dtype)
                        or (bf16_seconds if dtype == torch.bfloat16 else 1.0))
    ds = REPO / "configs" / ("ds_config.json" if precision == "bf16" else "ds_config_fp32.json")
    cfg = load_config(tiny_config(tmp_path, digits_root, train={**TINY_OVERRIDES["train"], "engine": "deepspeed",
                                                                "deepspeed_config": str(ds)}))
    model = JRCLNet(cfg.model, 10)
    optimizer = build_optimizer(cfg.optim, model)
    world_size = ranks[1]
    if world_size > 1:
        def join(*_):
            raise JoiningTheGroup

        monkeypatch.setattr(backends, "init_process_group", join)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _, description = backends.build_engine(cfg, Ranks(*ranks), torch.device("cpu"), model, optimizer,
                                                   build_scheduler(cfg.optim, optimizer, 100, 1))
            assert f"rank(s), {precision}," in description
        except JoiningTheGroup:
            assert world_size > 1
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigWarning)]
    assert timed == ([torch.bfloat16, torch.float32] if precision == "bf16" and ranks[0] == 0 else [])
    if timed and bf16_seconds > 3:
        (message,) = messages
        assert message.startswith(f"{ds} trains CPU ranks in bf16") and f"{bf16_seconds:.1f}x fp32's time" in message
        assert '"bf16": {"enabled": false}' in message and "configs/ds_config_fp32.json" in message
        assert ("train.engine=local" in message) == (world_size == 1) and "\n" not in message
    else:
        assert messages == []


@pytest.fixture
def fp16_capable(monkeypatch):
    """DeepSpeed's CPU backend taking fp16, as its CUDA backend does (and CPUs with oneDNN
    fp16): the fp16 engine's rules then run here."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)


@pytest.mark.parametrize("stage", [0, 1])
def test_deepspeed_fp16_updates_at_each_zero_stage(stage, fp16_capable, one_rank_deepspeed):
    """Why backends.deepspeed_config refuses fp16 at ZeRO stage 0: there DeepSpeed's fp16
    optimizer divides the gradients by a loss scale that engine.backward never applied
    (deepspeedai/DeepSpeed#8393), so SGD with lr 1 on a gradient of ones moves each weight
    by 1/scale, not by 1 (the H100 run that "did not learn"). Stage 1 moves it by 1. If
    stage 0 starts moving by 1, DeepSpeed has fixed it: lift the refusal."""
    import deepspeed

    torch.manual_seed(stage)
    model = nn.Linear(4, 1, bias=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config={
        "train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True, "initial_scale_power": 8},
        "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0})
    before = engine.module.weight.detach().float().clone()
    engine.backward(engine(torch.ones(1, 4, dtype=torch.float16)).float().sum())  # d/dw = ones
    engine.step()
    assert engine.skipped_steps == 0
    moved = before - engine.module.weight.detach().float()
    expected = 1.0 / 2**8 if stage == 0 else 1.0
    assert torch.allclose(moved, torch.full_like(moved, expected), rtol=0.01, atol=1e-3), moved


def test_fp16_deepspeed_engine_with_the_shipped_config_trains(tmp_path, digits_root, monkeypatch, fp16_capable,
                                                               one_rank_deepspeed):
    """configs/ds_config_fp16.json (dynamic loss scaling, ZeRO stage 1) through the real
    engine set-up and train_step: every layer holds fp16 parameters and statistics, the
    overflow steps of the first loss scales are skipped, and the applied steps fit one
    batch (the cross-entropy halves); on the H100 stage 0 stayed flat for 30 epochs."""
    from jrcl_fast.config import load_config
    from jrcl_fast.engine.trainer import train_step
    from jrcl_fast.losses.objective import JRCLObjective

    cfg = load_config(tiny_config(tmp_path, digits_root,
                                  train={**TINY_OVERRIDES["train"], "engine": "deepspeed", "batch_size": 8,
                                         "deepspeed_config": str(REPO / "configs" / "ds_config_fp16.json")},
                                  optim={"warmup_epochs": 0},
                                  model={"backbone": "resnet32", "projection_dim": 16, "projection_hidden_dim": 32}))
    engine, description = engine_as_on_a_gpu_machine(cfg, monkeypatch)
    assert "fp16, ZeRO stage 1" in description
    assert_each_layer_in(engine.module, torch.float16)
    objective = JRCLObjective(cfg.loss, np.linspace(50, 2, 10).astype(int), np.arange(10) == 0, torch.device("cpu"))
    images, labels = torch.randn(8, 2, 3, 8, 8), torch.arange(8) % 10
    ce = [float(train_step(engine, objective, images, labels, torch.device("cpu"))["ce"]) for _ in range(20)]
    applied = engine.global_steps - engine.skipped_steps
    assert 0 < engine.skipped_steps < 10 and applied >= 10, (engine.skipped_steps, applied)
    assert all(np.isfinite(ce)) and ce[-1] < 0.5 * ce[0], ce


@pytest.mark.slow
def test_an_fp16_run_trains_checkpoints_and_evaluates(tmp_path, digits_root):
    """The whole CLI path with configs/ds_config_fp16.json, on a CPU told to take fp16 as
    a GPU does: training, ZeRO-1 checkpoints of fp16 weights, evaluation of their fp32
    copy, and `jrcl-fast eval` of the checkpoint giving the same results."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator\n"
                                           "CPU_Accelerator.is_fp16_supported = lambda self: True\n")
    # one_rank_deepspeed's process group, if up, leaves its RANK/MASTER_* in this process
    ours = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {**{k: v for k, v in os.environ.items() if k not in ours}, "PYTHONPATH": str(hook), "DS_ACCELERATOR": "cpu"}
    config = tiny_config(tmp_path, digits_root,
                         train={**TINY_OVERRIDES["train"], "engine": "deepspeed", "device": "cpu", "epochs": 1,
                                "deepspeed_config": str(REPO / "configs" / "ds_config_fp16.json")},
                         model={"backbone": "resnet32", "projection_dim": 16, "projection_hidden_dim": 32})
    done = run_cli("train", "--config", str(config), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DeepSpeed, 1 rank(s), fp16, ZeRO stage 1" in done.stdout
    run = tmp_path / "run"
    results = json.loads((run / "results.json").read_text())
    assert 0 <= results["balanced_accuracy"] <= 1 and results["num_test_images"] > 0
    assert (run / "checkpoints" / "latest").read_text() == "epoch_0001"
    again = run_cli("eval", "--checkpoint", str(run / "checkpoints"), "--output-dir", str(tmp_path / "eval"), env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "results.json").read_text()) == results


def test_match_buffers_to_parameters_follows_each_layer():
    """A layer kept in fp32 (e.g. by DeepSpeed's keep_in_fp32 lists) keeps fp32
    statistics; a bf16 layer gets bf16 ones; a layer without parameters is left alone."""
    from jrcl_fast.engine.backends import match_buffers_to_parameters

    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3))
    model[0].bfloat16()
    model[0].running_mean.data, model[0].running_var.data = model[0].running_mean.float(), model[0].running_var.float()
    match_buffers_to_parameters(model)
    assert model[0].running_mean.dtype == model[0].running_var.dtype == torch.bfloat16
    assert model[0].num_batches_tracked.dtype == torch.long
    assert model[1].running_mean.dtype == torch.float32
    assert model[2].running_mean.dtype == torch.float32


def test_default_deepspeed_config_is_the_shipped_file():
    """A config without train.deepspeed_config gets what configs/ds_config.json says,
    the doctor's fp16 step runs what configs/ds_config_fp16.json says, and
    configs/ds_config_fp32.json is the default in fp32."""
    from jrcl_fast.engine.backends import DEFAULT_DEEPSPEED_CONFIG, FP16_DEEPSPEED_CONFIG

    shipped = json.loads((REPO / "configs" / "ds_config.json").read_text())
    assert not shipped.pop("fp16")["enabled"]
    assert shipped == DEFAULT_DEEPSPEED_CONFIG
    assert json.loads((REPO / "configs" / "ds_config_fp16.json").read_text()) == FP16_DEEPSPEED_CONFIG
    fp32 = json.loads((REPO / "configs" / "ds_config_fp32.json").read_text())
    assert fp32 == {**shipped, "fp16": fp32["fp16"], "bf16": {"enabled": False}} and not fp32["fp16"]["enabled"]


def test_zero_stage_3_is_refused(tmp_path, digits_root):
    from jrcl_fast.config import load_config
    from jrcl_fast.engine.backends import deepspeed_config
    from jrcl_fast.errors import UserError

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}}))
    cfg = load_config(tiny_config(tmp_path, digits_root, train={**TINY_OVERRIDES["train"], "deepspeed_config": str(ds)}))
    with pytest.raises(UserError, match="zero_optimization.stage 3 is not supported"):
        deepspeed_config(cfg, 1, torch.device("cpu"))


# ---------------------------------------------------------------- device selection


def test_a_rank_without_a_gpu_of_its_own_is_refused_in_one_line(gpu_present, monkeypatch):
    from jrcl_fast.errors import UserError
    from jrcl_fast.runtime import Ranks, select_device

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail(f"set_device({i}) on a missing GPU"))
    with pytest.raises(UserError, match="rank 1 has local rank 1 but this node has 1 GPU"):
        select_device("auto", Ranks(1, 2, 1))


def test_cpu_ranks_on_a_gpu_machine_stay_on_the_cpu_and_tell_deepspeed(gpu_present, monkeypatch):
    from jrcl_fast.runtime import Ranks, select_device

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: pytest.fail("a CPU rank touched CUDA"))
    assert select_device("cpu", Ranks(1, 2, 1)) == torch.device("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    # DS_ACCELERATOR=cpu, as the README's CPU launcher command sets it, means CPU ranks
    assert select_device("auto", Ranks(1, 2, 1)) == torch.device("cpu")


def test_cpu_ranks_with_deepspeed_pointed_at_cuda_are_refused(gpu_present, monkeypatch):
    from jrcl_fast.errors import UserError
    from jrcl_fast.runtime import Ranks, select_device

    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(UserError, match="runs on the CPU but DS_ACCELERATOR=cuda"):
        select_device("cpu", Ranks())


def test_dali_decodes_where_the_ranks_run(gpu_present, monkeypatch):
    pytest.importorskip("nvidia.dali")
    from jrcl_fast.data.dali_loader import dali_on_gpu
    from jrcl_fast.runtime import Ranks, select_device

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert dali_on_gpu()
    select_device("cpu", Ranks())
    assert not dali_on_gpu()  # CPU ranks on a GPU machine decode on the CPU too


def test_the_local_rank_picks_its_gpu(gpu_present, monkeypatch):
    from jrcl_fast.errors import UserError
    from jrcl_fast.runtime import Ranks, select_device

    chosen = []
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_device("auto", Ranks(4, 8, 0)) == torch.device("cuda", 0) and chosen == [0]
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    with pytest.raises(UserError, match="DS_ACCELERATOR=cpu"):
        select_device("cuda", Ranks())


def test_cuda_without_a_gpu_is_refused(monkeypatch):
    from jrcl_fast.errors import UserError
    from jrcl_fast.runtime import Ranks, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        select_device("cuda", Ranks())
    assert select_device("auto", Ranks()) == torch.device("cpu")


def test_nccl_only_for_gpu_ranks(monkeypatch):
    import deepspeed

    from jrcl_fast import runtime
    from jrcl_fast.runtime import Ranks, init_process_group

    backends, started = [], []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: backends.append(dist_backend))
    # the bounded multi-rank start-up (jrcl_fast.network) starts the group first, DeepSpeed adopts it
    monkeypatch.setattr(runtime, "start_process_group", lambda rank, local, world, backend, *_: started.append(backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    init_process_group(Ranks(0, 2, 0), torch.device("cpu"), 10)
    init_process_group(Ranks(0, 2, 0), torch.device("cuda", 0), 10)
    assert backends == started == ["gloo", "nccl"]


# ---------------------------------------------------------------- torch versions


def test_collectives_fall_back_to_the_names_of_older_torch(monkeypatch):
    """torch 2.11 has neither all_gather_single_autograd nor dist.all_gather_single."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as functional

    from jrcl_fast import compat

    monkeypatch.delattr(functional, "all_gather_single_autograd", raising=False)
    monkeypatch.delattr(dist, "all_gather_single", raising=False)
    try:
        importlib.reload(compat)
        assert compat.all_gather_single_autograd is functional.all_gather_tensor_autograd
        assert compat.all_gather_single is dist.all_gather_into_tensor
    finally:
        monkeypatch.undo()
        importlib.reload(compat)


def test_setup_declares_the_lowest_torch_ci_runs():
    """setup.py's floor is the torch that .ci/run installs in its second environment."""
    import re

    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "setup.py").read_text()).group(1)
    assert f"torch=={floor}" in (REPO / ".ci" / "run").read_text()


# ---------------------------------------------------------------- the interpreter switch

@pytest.mark.parametrize("value,interpreted", [("1", True), ("true", True), ("TRUE", True), ("on", True),
                                               ("0", False), ("false", False), ("", False)])
def test_triton_interpret_is_read_by_tritons_rule(value, interpreted, monkeypatch):
    """kernels/_common.py reads TRITON_INTERPRET as Triton's @triton.jit does (its knob);
    `true` was once taken for "interpret" by Triton and the CLI but not by the kernels."""
    import triton

    from jrcl_fast.kernels._common import interpreter_enabled

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled() is interpreted is bool(triton.knobs.runtime.interpret)


INTERPRETED_KERNELS = """
import json, torch
from triton.runtime.autotuner import Autotuner
from jrcl_fast.doctor import ce_bdc_case, compare, o2a_case
from jrcl_fast.kernels import _common, o2a
cpu = torch.device("cpu")
checks = [compare(case(37, 24, 5, torch.float32, cpu), torch.float32) for case in (o2a_case, ce_bdc_case)]
print(json.dumps({"interpreted": _common.INTERPRETED, "autotuned": isinstance(o2a._o2a_fwd_kernel, Autotuner),
                  "checks": checks}))
"""


@pytest.mark.parametrize("value", ["true", "1"])
def test_triton_interpret_true_runs_the_kernels_on_the_cpu_like_1(value):
    """With TRITON_INTERPRET=true the kernels take the interpreter's path too (no GPU
    autotuner, which fails without a GPU: "0 active drivers") and match the reference."""
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": value, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_KERNELS], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert got["interpreted"] and not got["autotuned"], got
    assert [ok for ok, _detail in got["checks"]] == [True, True], got
