"""The engine contract (engine/contract.py: TrainingEngine): DeepSpeed's engine and the
local engine both satisfy it, so that the loop, the checkpoints and `jrcl-fast doctor`
read nothing outside it."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import typing

import numpy as np
import torch
from helpers import REPO

from jrcl_fast.config import parse_config
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.engine.run_setup import build_training_stack
from jrcl_fast.engine.trainer import train_step
from jrcl_fast.runtime import Ranks

METHODS = ("__call__", "backward", "step", "get_lr", "save_checkpoint", "load_checkpoint")
FIELDS = ("module", "global_steps", "skipped_steps")
ARGUMENTS = {"save_checkpoint": {"save_dir": "d", "tag": "t", "client_state": {}, "save_latest": False},
             "load_checkpoint": {"load_dir": "d", "tag": "t"}}


def tiny_cfg(**train):
    return parse_config({"data": {"name": "digits_lt", "root": "unused", "image_size": 8},
                         "model": {"backbone": "resnet32", "projection_dim": 8, "projection_hidden_dim": 16},
                         "train": {"batch_size": 4, "epochs": 1, **train}}, "test")


def stack_of(cfg):
    return build_training_stack(cfg, Ranks(), torch.device("cpu"), 5, np.array([40, 20, 10, 5, 2]),
                                np.arange(5) == 0, steps_per_epoch=4)


def test_the_contract_lists_what_the_loop_uses():
    members = {name for name in dir(TrainingEngine) if not name.startswith("_")} | set(
        typing.get_type_hints(TrainingEngine))
    assert set(METHODS) - {"__call__"} | set(FIELDS) <= members


def test_deepspeeds_engine_class_has_every_method_with_the_contracts_arguments():
    from deepspeed.runtime.engine import DeepSpeedEngine

    for name in METHODS:
        assert callable(getattr(DeepSpeedEngine, name, None)), name
    for name, arguments in ARGUMENTS.items():
        inspect.signature(getattr(DeepSpeedEngine, name)).bind(None, **arguments)  # raises if one is missing
        inspect.signature(getattr(TrainingEngine, name)).bind(None, **arguments)


def test_the_local_engine_satisfies_the_contract_and_counts_its_steps(tmp_path):
    cfg = tiny_cfg(engine="local", gradient_accumulation_steps=2)
    stack = stack_of(cfg)
    engine = stack.engine
    assert isinstance(engine, TrainingEngine) and "local engine" in stack.description
    images, labels = torch.randn(4, 2, 3, 8, 8), torch.arange(4)
    for _ in range(5):
        train_step(engine, stack.objective, images, labels, torch.device("cpu"))
    assert (engine.global_steps, engine.skipped_steps) == (2, 0)  # 5 micro steps, 2 accumulation boundaries
    engine.save_checkpoint(str(tmp_path), "epoch_0001", {"epochs_done": 1})
    fresh = stack_of(cfg).engine
    path, client_state = fresh.load_checkpoint(str(tmp_path), "epoch_0001")
    assert fresh.global_steps == 2 and client_state == {"epochs_done": 1} and path.endswith("model_states.pt")


DEEPSPEED_ENGINE = """
import json, sys
import numpy as np, torch
sys.path.insert(0, "tests")
from test_engine_contract import FIELDS, stack_of, tiny_cfg
from deepspeed.runtime.engine import DeepSpeedEngine
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.engine.trainer import train_step

stack = stack_of(tiny_cfg(engine="deepspeed"))
engine = stack.engine
train_step(engine, stack.objective, torch.randn(4, 2, 3, 8, 8), torch.arange(4), torch.device("cpu"))
print(json.dumps({"deepspeed": type(engine) is DeepSpeedEngine, "contract": isinstance(engine, TrainingEngine),
                  "fields": [hasattr(engine, name) for name in FIELDS], "steps": engine.global_steps,
                  "lr": engine.get_lr(), "description": stack.description}))
"""


def test_a_cpu_built_deepspeed_engine_satisfies_the_contract():
    """In a process of its own: a DeepSpeed process group in this one would confuse the
    one test_gpu_rules.py keeps for its engines."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-c", DEEPSPEED_ENGINE], capture_output=True, text=True, cwd=REPO,
                          env={**env, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["deepspeed"] and got["contract"] and all(got["fields"]), got
    assert got["steps"] == 1 and len(got["lr"]) >= 1 and got["description"].startswith("DeepSpeed, 1 rank(s), bf16")
