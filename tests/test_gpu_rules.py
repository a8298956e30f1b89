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

import pytest
import torch
from helpers import REPO, TINY_OVERRIDES, tiny_config
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


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_bf16_deepspeed_engine_gives_each_layer_one_dtype_and_trains(tmp_path, digits_root, monkeypatch, norm,
                                                                     one_rank_deepspeed):
    """The real engine set-up of a GPU run (DeepSpeed, the default bf16 config), one
    optimizer step: every layer's buffers share its parameters' dtype, the forward and
    backward pass run, and the weights move."""
    from jrcl_fast.config import load_config
    from jrcl_fast.engine.backends import build_engine
    from jrcl_fast.engine.optim import build_optimizer, build_scheduler
    from jrcl_fast.models import JRCLNet
    from jrcl_fast.runtime import Ranks

    config = tiny_config(tmp_path, digits_root, train={**TINY_OVERRIDES["train"], "engine": "deepspeed"},
                         model={"norm": norm, "projection_dim": 16, "projection_hidden_dim": 32})
    cfg = load_config(config)
    assert cfg.train.deepspeed_config == str(REPO / "configs" / "ds_config.json")  # the shipped default, bf16
    torch.manual_seed(0)
    model = JRCLNet(cfg.model, 10)
    optimizer = build_optimizer(cfg.optim, model)
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
        engine, description = build_engine(cfg, Ranks(), torch.device("cpu"), model, optimizer,
                                           build_scheduler(cfg.optim, optimizer, 10, 1))
    assert "bf16" in description
    for name, layer in engine.module.named_modules():
        dtypes = {t.dtype for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False))
                  if t.is_floating_point()}
        assert dtypes <= {torch.bfloat16}, (name, dtypes)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    images = torch.randn(8, 3, 8, 8, dtype=torch.bfloat16)
    out = engine(images)
    loss = nn.functional.cross_entropy(out.logits.float(), torch.arange(8) % 10) + out.features.float().sum()
    engine.backward(loss)
    engine.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters()))


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
    """A config without train.deepspeed_config gets what configs/ds_config.json says."""
    from jrcl_fast.engine.backends import DEFAULT_DEEPSPEED_CONFIG

    shipped = json.loads((REPO / "configs" / "ds_config.json").read_text())
    assert not shipped.pop("fp16")["enabled"]
    assert shipped == DEFAULT_DEEPSPEED_CONFIG


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

    from jrcl_fast.runtime import Ranks, init_process_group

    backends = []
    monkeypatch.setattr(deepspeed, "init_distributed", lambda dist_backend, timeout: backends.append(dist_backend))
    monkeypatch.setenv("WORLD_SIZE", "2")
    init_process_group(Ranks(0, 2, 0), torch.device("cpu"), 10)
    init_process_group(Ranks(0, 2, 0), torch.device("cuda", 0), 10)
    assert backends == ["gloo", "nccl"]


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
