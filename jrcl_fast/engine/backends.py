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

import difflib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jrcl_fast.checkpoint import MODEL_STATES, save_model_states
from jrcl_fast.config import Config
from jrcl_fast.engine.contract import TrainingEngine
from jrcl_fast.engine.cpu_bf16 import warn_if_bf16_is_slow
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
    "communication_data_type": "fp32",
    "gradient_clipping": 0.0,
    "steps_per_print": 1_000_000,
    "wall_clock_breakdown": False,
}
# The fp16 engine that runs: dynamic loss scaling at ZeRO stage 1 (stage 0 leaves the
# loss unscaled, see deepspeed_config); what configs/ds_config_fp16.json holds (a test
# keeps them equal), and what `jrcl-fast doctor` checks.
FP16_DEEPSPEED_CONFIG: dict[str, Any] = {
    # bf16's fp32 all-reduce left out: fp16 keeps DeepSpeed's default (fp16) until a GPU run tries it
    **{key: value for key, value in DEFAULT_DEEPSPEED_CONFIG.items() if key != "communication_data_type"},
    "bf16": {"enabled": False},
    "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
             "hysteresis": 2, "min_loss_scale": 1},
    "zero_optimization": {"stage": 1},
}
# ZeRO stage 3 partitions the parameters themselves, which the fp32 copy for evaluation
# and the LocalEngine-compatible checkpoint layout do not handle.
ZERO_STAGES = (0, 1, 2)
# Every top-level key DeepSpeed 0.19.8 reads from its config: what DeepSpeedConfig looks up
# (runtime/config.py and the section readers it calls: monitor, comms, profiling,
# autotuning, activation checkpointing, aio, data efficiency, compression, nebula, ...)
# and deepspeed.initialize's sequence_parallel_size / data_parallel_size.
# tests/test_deepspeed_config.py records the keys DeepSpeed itself reads and keeps this
# set equal to them. Keys DeepSpeed has removed (amp, elasticity, ...) are in it: DeepSpeed
# refuses them with its own reason, which deepspeed_check passes on in one line.
DEEPSPEED_TOP_LEVEL_KEYS = frozenset({
    "activation_checkpointing", "aio", "amp", "autotuning", "bf16", "bfloat16", "checkpoint", "comet", "comms_logger",
    "communication_data_type", "compile", "compression_training", "csv_monitor", "curriculum_learning",
    "data_efficiency", "data_parallel_size", "data_types", "dataloader_drop_last", "datastates_ckpt",
    "disable_allgather", "disable_python_gc", "dump_state", "eigenvalue", "elasticity", "expert_parallel",
    "flops_profiler", "fp16", "gradient_accumulation_steps", "gradient_allreduce_op", "gradient_clipping",
    "gradient_predivide_factor", "graph_harvesting", "hybrid_engine", "log_level", "managed_gradient_accumulation",
    "memory_breakdown", "nebula", "optimizer", "pipeline", "prescale_gradients", "progressive_layer_drop",
    "quantize_training", "scheduler", "seq_parallel_communication_data_type", "sequence_parallel_size",
    "sparse_attention", "sparse_gradients", "steps_per_print", "tensor_parallel", "tensorboard", "timers",
    "torch_autocast", "train_batch_size", "train_micro_batch_size_per_gpu", "use_data_before_expert_parallelism",
    "vocabulary_size", "wall_clock_breakdown", "wandb", "weight_quantization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "zero_optimization",
})
# Sections this module reads itself: each must be a JSON object.
OWN_SECTIONS = ("zero_optimization", "bf16", "fp16", "data_types")
# The DeepSpeed whose config reader DEEPSPEED_TOP_LEVEL_KEYS and the messages describe.
DEEPSPEED_VERSION = "0.19.8"


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


def deepspeed_json_name(cfg: Config) -> str:
    """What to call the DeepSpeed config in messages."""
    return cfg.train.deepspeed_config or "the built-in DeepSpeed config"


def read_deepspeed_json(cfg: Config) -> tuple[dict[str, Any], str]:
    """The DeepSpeed config as a dict, and what to call it in messages."""
    if cfg.train.deepspeed_config is None:
        return dict(DEFAULT_DEEPSPEED_CONFIG), deepspeed_json_name(cfg)
    path = Path(cfg.train.deepspeed_config)
    if not path.is_file():
        raise UserError(f"train.deepspeed_config {path} does not exist; point it at a DeepSpeed JSON config "
                        "such as configs/ds_config.json (a relative path is relative to the YAML file), or "
                        "leave the key out for the built-in default")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} line {err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(ds, dict):
        raise UserError(f"{path}: a DeepSpeed config is one JSON object {{...}}, not a {type(ds).__name__}")
    if "bfloat16" in ds:  # DeepSpeed's other name for the bf16 section: one name below
        if "bf16" in ds:
            raise UserError(f"{path}: both 'bf16' and 'bfloat16' are set, which name the same section; keep 'bf16'")
        ds["bf16"] = ds.pop("bfloat16")
    return ds, deepspeed_json_name(cfg)


def check_known_keys(ds: dict[str, Any], path: str) -> None:
    """Every top-level key is one DeepSpeed reads (a misspelt section is otherwise ignored)."""
    for key in ds:
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, sorted(DEEPSPEED_TOP_LEVEL_KEYS), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise UserError(f"{path}: unknown top-level key '{key}' (DeepSpeed {DEEPSPEED_VERSION} does not read "
                            f"it); {hint}fix or remove it")
    for key in OWN_SECTIONS:
        if not isinstance(ds.get(key, {}), dict):
            raise UserError(f"{path}: '{key}' must be a JSON object such as {{\"enabled\": true}}, "
                            f"not {json.dumps(ds[key])}")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise UserError(f"{path}: gradient_clipping must be a number >= 0 (0 turns clipping off), not "
                        f"{json.dumps(clip)}")


def check_batch_keys(ds: dict[str, Any], path: str, cfg: Config, world_size: int) -> dict[str, int]:
    """The batch keys the YAML config gives; a batch key the file sets must agree with them."""
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
    return wanted


def check_precision(ds: dict[str, Any], path: str, stage: Any, device: torch.device) -> None:
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
    accum_dtype = ds.get("data_types", {}).get("grad_accum_dtype")
    if stage == 0 and precision_of(ds) == "bf16" and accum_dtype not in (None, "bf16", "bfloat16"):
        # DeepSpeed's engine raises NotImplementedError("unsupported mix ...") for it, after
        # the ranks have met.
        raise UserError(f"{path}: data_types.grad_accum_dtype {accum_dtype} with bf16 needs zero_optimization.stage "
                        "1 or 2 (DeepSpeed accumulates in the weights' dtype at stage 0); remove it or raise the "
                        "stage")


def fill_required_keys(ds: dict[str, Any], path: str, stage: Any) -> tuple[dict[str, Any], str]:
    """`ds` with the keys this trainer needs and the file lacks, and a note naming them.

    The optimizer is a torch one from the YAML config, which ZeRO accepts only with
    zero_allow_untested_optimizer. In bf16, gradients are accumulated (ZeRO 1 and 2; stage
    0 does not allow it) and all-reduced in fp32 rather than bf16 (docs/PRECISION.md).
    """
    if stage and ds.get("zero_allow_untested_optimizer") is False:
        raise UserError(f"{path}: zero_allow_untested_optimizer is false, but at ZeRO stage {stage} DeepSpeed then "
                        "refuses the torch optimizer the YAML optim section builds; set it to true or remove it")
    filled, named = dict(ds), []
    if stage and "zero_allow_untested_optimizer" not in ds:
        filled["zero_allow_untested_optimizer"] = True
        named.append("zero_allow_untested_optimizer=true")
    if precision_of(ds) == "bf16" and "communication_data_type" not in ds:
        filled["communication_data_type"] = "fp32"
        named.append('communication_data_type="fp32"')
    if precision_of(ds) == "bf16" and stage and "grad_accum_dtype" not in ds.get("data_types", {}):
        filled["data_types"] = {**ds.get("data_types", {}), "grad_accum_dtype": "fp32"}
        named.append('data_types.grad_accum_dtype="fp32"')
    return filled, f"filled in for {path}: {', '.join(named)}" if named else ""


def cpu_has_fp16() -> bool:
    """Whether DeepSpeed's CPU backend runs fp16 here (CPUs with oneDNN fp16 only)."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    return bool(CPU_Accelerator().is_fp16_supported())


def deepspeed_config(cfg: Config, world_size: int, device: torch.device) -> tuple[dict[str, Any], str]:
    """train.deepspeed_config checked, with the batch keys from the YAML config and the keys
    this trainer needs filled in; and a one-line note of what was filled ("" if nothing)."""
    ds, path = read_deepspeed_json(cfg)
    check_known_keys(ds, path)
    wanted = check_batch_keys(ds, path, cfg, world_size)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    check_precision(ds, path, stage, device)
    ds, note = fill_required_keys(ds, path, stage)
    return {**ds, **wanted}, note


def deepspeed_check(ds: dict[str, Any], path: str) -> None:
    """Run DeepSpeed's own config reader on `ds`, so that a value it refuses (a pydantic
    validation error, a bad dtype name, a removed feature) is one line naming the file and
    key before any rank waits on another, not a traceback from deepspeed.initialize."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # Read as one rank: train_batch_size, which counts the ranks, was checked above.
    base = {key: ds[key] for key in BATCH_KEYS[:2]}
    try:
        DeepSpeedConfig({**base, **{k: v for k, v in ds.items() if k != "train_batch_size"}})
        return
    except Exception as err:  # noqa: BLE001 - whatever DeepSpeed raises, the cause is this config
        failure = err
    for key in ds.keys() - set(BATCH_KEYS):  # the one section that fails on its own
        try:
            DeepSpeedConfig({**base, key: ds[key]})
        except Exception as err:  # noqa: BLE001
            raise UserError(f"{path}: {deepspeed_complaint(err, key)}; fix it (DeepSpeed {DEEPSPEED_VERSION}'s "
                            "config reference: https://www.deepspeed.ai/docs/config-json/)") from None
    raise UserError(f"{path}: DeepSpeed {DEEPSPEED_VERSION} refuses this config: {one_line(str(failure))}") from None


def deepspeed_complaint(err: Exception, key: str) -> str:
    """'key.sub: what is wrong' from an exception DeepSpeed's config reader raised for `key`."""
    errors = getattr(err, "errors", None)  # pydantic's ValidationError
    if callable(errors):
        first, *rest = errors()
        loc = [str(part) for part in first["loc"]]
        where = ".".join(loc if loc[:1] == [key] else [key, *loc])  # the monitor sections carry their own name
        got = f" (got {json.dumps(first['input'], default=str)})" if "input" in first else ""
        more = f" (and {len(rest)} more)" if rest else ""
        return f"{where}: {first['msg'].removeprefix('Value error, ')}{got}{more}"
    mapping = re.search(r"argument after \*\* must be a mapping, not (\w+)", str(err))
    if mapping:
        return f"{key} must be a JSON object {{...}}, not a {mapping.group(1)}"
    return f"{key}: {one_line(str(err))}"


def one_line(text: str) -> str:
    return " ".join(text.split())


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
    ds, filled = deepspeed_config(cfg, ranks.world_size, device)
    if not use_deepspeed(cfg, ranks, device):
        return (LocalEngine(model, optimizer, scheduler, cfg.train.gradient_accumulation_steps,
                            float(ds.get("gradient_clipping", 0.0))), "local engine, 1 process, fp32")
    import deepspeed

    deepspeed_check(ds, deepspeed_json_name(cfg))
    if device.type == "cpu" and precision_of(ds) == "bf16" and ranks.is_main:
        warn_if_bf16_is_slow(deepspeed_json_name(cfg), ranks.world_size)
    init_process_group(ranks, device, cfg.train.collective_timeout_s)
    if cfg.model.norm == "sync_batch" and ranks.world_size > 1:
        if device.type != "cuda":
            raise UserError("model.norm=sync_batch needs GPUs; on the CPU use model.norm=group for statistics "
                            "that do not depend on the rank count")
        model.sync_batch_norms()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds)
    match_buffers_to_parameters(engine.module)
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    return engine, (f"DeepSpeed, {ranks.world_size} rank(s), {precision_of(ds)}, ZeRO stage {stage}, "
                    f"{gradient_dtypes(engine)}{f' ({filled})' if filled else ''}")


def gradient_dtypes(engine: Any) -> str:
    """What the engine itself reports: the dtype gradients accumulate and are all-reduced in."""
    short = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    accumulate, reduce = engine.get_data_types()[1], engine.communication_data_type
    return f"gradients accumulated in {short[accumulate]}, all-reduced in {short[reduce]}"
