"""The engine the training loop drives: DeepSpeed, or a local stand-in with its API.

The loop uses only what the engine contract (contract.py: TrainingEngine) lists, so one
loop serves both. DeepSpeed runs whenever the job is launched with several
ranks or the rank's device is a GPU (train.engine: auto; train.device picks it). A
plain one-process CPU run uses LocalEngine instead: it has nothing to communicate.
LocalEngine follows DeepSpeed's semantics (loss divided by the accumulation steps, an
optimizer and scheduler step at each accumulation boundary, the same clipping and the
same checkpoint layout) in fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jrcl_fast.checkpoint import MODEL_STATES, save_model_states
from jrcl_fast.config import Config
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.errors import UserError
from jrcl_fast.models import JRCLNet
from jrcl_fast.runtime import Ranks, init_process_group

# Keys of the DeepSpeed config that the YAML config owns.
BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")
# train.deepspeed_config left out: what configs/ds_config.json holds (a test keeps them equal).
DEFAULT_DEEPSPEED_CONFIG: dict[str, Any] = {
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 0},
    "zero_allow_untested_optimizer": True,
    "gradient_clipping": 0.0,
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}
# The fp16 engine that runs: dynamic loss scaling at ZeRO stage 1 (stage 0 leaves the
# loss unscaled, see deepspeed_config); what configs/ds_config_fp16.json holds (a test
# keeps them equal), and what `jrcl-fast doctor` checks.
FP16_DEEPSPEED_CONFIG: dict[str, Any] = {
    **DEFAULT_DEEPSPEED_CONFIG,
    "bf16": {"enabled": False},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 1},
}
# ZeRO stage 3 partitions the parameters themselves, which the fp32 copy for evaluation
# and the LocalEngine-compatible checkpoint layout do not handle.
ZERO_STAGES = (0, 1, 2)


class LocalEngine:
    """One process, fp32, no DeepSpeed: the engine contract (TrainingEngine) with
    DeepSpeedEngine's semantics."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, accumulation_steps: int, clip: float):
        self.module, self.optimizer, self.lr_scheduler = model, optimizer, scheduler
        self.accumulation_steps, self.clip = accumulation_steps, clip
        self.micro_steps = 0
        self.global_steps = 0
        self.skipped_steps = 0  # fp32 has no overflow to skip

    def __call__(self, *args: Any) -> Any:
        return self.module(*args)

    def backward(self, loss: Tensor) -> None:
        (loss / self.accumulation_steps).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accumulation_steps:
            return
        self.global_steps += 1
        if self.clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def save_checkpoint(self, save_dir: str, tag: str, client_state: dict[str, Any],
                        save_latest: bool = False) -> None:
        save_model_states(Path(save_dir) / tag / MODEL_STATES, {
            "module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(), "global_steps": self.global_steps, **client_state})

    def load_checkpoint(self, load_dir: str, tag: str) -> tuple[str, dict[str, Any]]:
        path = Path(load_dir) / tag / MODEL_STATES
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.module.load_state_dict(state.pop("module"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        self.lr_scheduler.load_state_dict(state.pop("lr_scheduler"))
        self.global_steps = state.pop("global_steps", 0)  # absent from checkpoints before the contract
        self.micro_steps = 0
        return str(path), state


def use_deepspeed(cfg: Config, ranks: Ranks, device: torch.device) -> bool:
    if cfg.train.engine == "local" and ranks.world_size > 1:
        raise UserError(f"train.engine=local runs one process, but this job was launched with "
                        f"{ranks.world_size} ranks; use train.engine=auto or deepspeed")
    return cfg.train.engine == "deepspeed" or (
        cfg.train.engine == "auto" and (ranks.world_size > 1 or device.type == "cuda"))


def read_deepspeed_json(cfg: Config) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config as a dict, and what to call it in messages."""
    if cfg.train.deepspeed_config is None:
        return dict(DEFAULT_DEEPSPEED_CONFIG), "the built-in DeepSpeed config"
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise UserError(f"train.deepspeed_config {path} does not exist; point it at a DeepSpeed JSON config "
                        "such as configs/ds_config.json (a relative path is relative to the YAML file), or "
                        "leave the key out for the built-in default")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None


def cpu_has_fp16() -> bool:
    """Whether DeepSpeed's CPU backend runs fp16 here (CPUs with oneDNN fp16 only)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return bool(CPU_Accelerator().is_fp16_supported())


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> dict[str, Any]:
    """train.deepspeed_config with the batch keys filled from the YAML config; a
    batch key the file sets must agree with it."""
    ds, path = read_deepspeed_json(cfg)
    micro, accum = cfg.train.batch_size, cfg.train.gradient_accumulation_steps
    wanted = dict(zip(BATCH_KEYS, (micro, accum, micro * accum * world_size)))
    for key, value in wanted.items():
        if ds.get(key, "auto") not in ("auto", value):
            raise UserError(
                f"{path}: {key}={ds[key]} disagrees with the YAML config (train.batch_size={micro} per rank x "
                f"train.gradient_accumulation_steps={accum} x {world_size} rank(s) gives {key}={value}); "
                f"remove {key} from {path} or make them agree")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise UserError(f"{path}: remove the '{key}' section; the {key} comes from the YAML optim section")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if ds.get("fp16", {}).get("enabled"):
        if device.type != "cuda" and not cpu_has_fp16():
            raise UserError(f"{path}: DeepSpeed's CPU backend has no fp16 on this CPU; set fp16.enabled to false "
                            "and bf16.enabled to true (or false for fp32)")
        if stage == 0:
            # DeepSpeed <= 0.19.8 scales the loss in engine.backward only for its ZeRO
            # optimizers, yet its stage-0 fp16 optimizer divides every gradient by the loss
            # scale: each update comes out loss-scale times (2^16 at first) too small and
            # nothing learns (deepspeedai/DeepSpeed#8393; tests/test_gpu_rules.py watches
            # for the fix).
            raise UserError(f"{path}: fp16 with zero_optimization.stage 0 does not learn (DeepSpeed leaves the loss "
                            "unscaled there, deepspeedai/DeepSpeed#8393); set zero_optimization.stage to 1 or 2, "
                            "as configs/ds_config_fp16.json does, or use bf16")
    if stage not in ZERO_STAGES:
        raise UserError(f"{path}: zero_optimization.stage {stage} is not supported; use 0, 1 or 2 (stage 3 "
                        "partitions the weights, which evaluation and the checkpoints here do not handle)")
    return {**ds, **wanted}


def precision_of(ds: dict[str, Any]) -> str:
    for name in ("bf16", "fp16"):
        if ds.get(name, {}).get("enabled"):
            return name
    return "fp32"


def match_buffers_to_parameters(module: nn.Module) -> None:
    """Give every floating buffer the dtype of its own layer's parameters.

    DeepSpeed's bf16/fp16 engine casts the parameters; whether it casts the buffers
    depends on its version (older ones called `module.bfloat16()`, 0.19 casts buffers
    only when `data_types.buffer_dtype` is set). BatchNorm's kernels, on the GPU (cuDNN
    and native) and on the CPU alike, refuse half-precision weights with fp32 running
    statistics, so the statistics follow their layer. Layers without parameters keep
    their buffers. docs/PRECISION.md has the whole design.
    """
    for layer in module.modules():
        params = [p for p in layer.parameters(recurse=False) if p.is_floating_point()]
        if not params:
            continue
        for buffer in layer.buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() and buffer.dtype != params[0].dtype:
                buffer.data = buffer.data.to(params[0].dtype)


def build_engine(cfg: Config, ranks: Ranks, device: torch.device, model: JRCLNet,
                 optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler) -> tuple[TrainingEngine, str]:
    """The engine for this run, and a one-line description of it for the log."""
    ds = deepspeed_config(cfg, ranks.world_size, device)
    if not use_deepspeed(cfg, ranks, device):
        return (LocalEngine(model, optimizer, scheduler, cfg.train.gradient_accumulation_steps,
                            float(ds.get("gradient_clipping", 0.0))), "local engine, 1 process, fp32")
    import deepspeed

    init_process_group(ranks, device, cfg.train.collective_timeout_s)
    if cfg.model.norm == "sync_batch" and ranks.world_size > 1:
        if device.type != "cuda":
            raise UserError("model.norm=sync_batch needs GPUs; on the CPU use model.norm=group for statistics "
                            "that do not depend on the rank count")
        model.sync_batch_norms()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    match_buffers_to_parameters(engine.module)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return engine, f"DeepSpeed, {ranks.world_size} rank(s), {precision_of(ds)}, ZeRO stage {stage}"
