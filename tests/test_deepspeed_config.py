"""A user's DeepSpeed JSON (train.deepspeed_config) is checked before any rank waits on
another: unknown keys and values DeepSpeed refuses are one line naming the file and key,
and the keys this trainer needs are filled in. Cheap: one process, no launcher."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_OVERRIDES, run_cli, tiny_config

from jrcl_fast.errors import UserError

CPU = torch.device("cpu")


def user_config(tmp_path, digits_root, ds, model=None, **train):
    """The tiny digits-lt config with `ds` as its DeepSpeed JSON, on CPU ranks; `model`'s
    keys over the tiny model's."""
    path = tmp_path / "user_ds.json"
    path.write_text(json.dumps(ds))
    return tiny_config(tmp_path, digits_root,
                       model={"norm": "group", "projection_dim": 16, "projection_hidden_dim": 32, **(model or {})},
                       train={**TINY_OVERRIDES["train"], "device": "cpu", "deepspeed_config": str(path), **train})


def built(tmp_path, digits_root, ds, world_size=1):
    from jrcl_fast.config import load_config
    from jrcl_fast.engine.backends import deepspeed_config

    return deepspeed_config(load_config(user_config(tmp_path, digits_root, ds)), world_size, CPU)


# ---------------------------------------------------------------- the known top-level keys

class Recorder(dict):
    """A dict that notes every key looked up in it, by get, [], `in` or `in .keys()`."""

    def __init__(self, data, seen):
        super().__init__(data)
        self.seen = seen

    def get(self, key, *default):
        self.seen.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        recorder = self

        class Keys(list):
            def __contains__(self, key):
                return recorder.__contains__(key)

        return Keys(super().keys())


def test_known_top_level_keys_are_exactly_what_deepspeed_reads():
    """DEEPSPEED_TOP_LEVEL_KEYS against the keys DeepSpeed's own config reader looks up,
    recorded over configs that take its different branches (precisions, ZeRO stages,
    optimizer and scheduler sections, monitors), plus the two deepspeed.initialize reads.
    A new DeepSpeed that reads another key fails here instead of refusing users' configs."""
    import inspect

    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig

    from jrcl_fast.engine.backends import DEEPSPEED_TOP_LEVEL_KEYS

    base = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    variants = [
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}},
        {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}},
        {"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}, "communication_data_type": "fp32"},
        {"optimizer": {"type": "Adam", "params": {"lr": 0.1}}, "scheduler": {"type": "WarmupLR", "params": {}}},
        {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True}, "wandb": {"enabled": False}},
    ]
    seen: set[str] = set()
    for variant in variants:
        DeepSpeedConfig(Recorder({**base, **variant}, seen))
    initialize = inspect.getsource(deepspeed.initialize)
    outside = {key for key in ("sequence_parallel_size", "data_parallel_size") if f'"{key}"' in initialize}
    assert outside == {"sequence_parallel_size", "data_parallel_size"}
    assert len(seen) > 40  # the recorder sees DeepSpeed's reads at all
    assert seen | outside == DEEPSPEED_TOP_LEVEL_KEYS, (seen - DEEPSPEED_TOP_LEVEL_KEYS,
                                                        DEEPSPEED_TOP_LEVEL_KEYS - seen - outside)


@pytest.mark.parametrize("key", ["tensorboard", "csv_monitor", "wandb", "comet", "comms_logger", "flops_profiler",
                                 "activation_checkpointing", "checkpoint"])
def test_deepspeeds_own_sections_are_known(tmp_path, digits_root, key):
    from jrcl_fast.engine.backends import deepspeed_check

    ds, _ = built(tmp_path, digits_root, {"bf16": {"enabled": True}, key: {}})
    assert ds[key] == {}
    deepspeed_check(ds, "user_ds.json")  # DeepSpeed's reader takes the empty section too


def test_an_unknown_top_level_key_names_the_file_the_key_and_the_closest_known_one(tmp_path, digits_root):
    with pytest.raises(UserError, match=r"user_ds\.json: unknown top-level key 'zero_optimisation' .*did you mean "
                                        r"'zero_optimization'\?"):
        built(tmp_path, digits_root, {"zero_optimisation": {"stage": 1}})
    with pytest.raises(UserError, match=r"unknown top-level key 'my_notes' \(DeepSpeed 0\.19\.8 does not read it\); "
                                        r"fix or remove it"):
        built(tmp_path, digits_root, {"my_notes": "tried stage 2"})


def test_a_mistake_in_the_cli_is_one_line_without_a_traceback(tmp_path, digits_root):
    config = user_config(tmp_path, digits_root, {"bf16": {"enabled": True}, "tensorbaord": {"enabled": True}},
                         engine="deepspeed")
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    assert "unknown top-level key 'tensorbaord'" in done.stderr and "did you mean 'tensorboard'?" in done.stderr


# ---------------------------------------------------------------- values: ours, then DeepSpeed's

@pytest.mark.parametrize("ds, message", [
    ({"bf16": True}, r"'bf16' must be a JSON object such as \{\"enabled\": true\}, not true"),
    ({"zero_optimization": 1}, r"'zero_optimization' must be a JSON object .*, not 1"),
    ({"gradient_clipping": "1.0"}, r"gradient_clipping must be a number >= 0 .*not \"1.0\""),
    ({"gradient_clipping": -1}, r"gradient_clipping must be a number >= 0"),
    ({"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}},
     r"data_types.grad_accum_dtype fp32 with bf16 needs zero_optimization.stage 1 or 2"),
    ({"zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": False},
     r"zero_allow_untested_optimizer is false, .* set it to true or remove it"),
])
def test_our_own_checks(tmp_path, digits_root, ds, message):
    with pytest.raises(UserError, match=r"user_ds\.json: " + message):
        built(tmp_path, digits_root, ds)


# Realistic mistakes and what DeepSpeed 0.19.8 raises for each (a pydantic ValidationError,
# a TypeError, a ValueError, its DeepSpeedConfigError, an AssertionError): one line each.
DEEPSPEED_REFUSES = [
    ({"zero_optimization": {"stage": 1, "reduce_bucket_sise": 5e8}},
     r"zero_optimization\.reduce_bucket_sise: Extra inputs are not permitted \(got 500000000\.0\)"),
    ({"zero_optimization": {"stage": 1, "reduce_bucket_size": "big"}},
     r"zero_optimization\.reduce_bucket_size: Input should be a valid integer.*\(got \"big\"\)"),
    ({"zero_optimization": {"stage": 1, "offload_optimizer": {"device": "gpu"}}},
     r"zero_optimization\.offload_optimizer\.device: Input should be 'none', 'cpu' or 'nvme' \(got \"gpu\"\)"),
    ({"tensorboard": {"enabled": True, "output_dir": "tb"}},
     r"tensorboard\.output_dir: Extra inputs are not permitted"),
    ({"csv_monitor": True}, r"csv_monitor: Input should be a valid dictionary"),
    ({"wandb": {"enabled": "maybe"}}, r"wandb\.enabled: Input should be a valid boolean"),
    ({"fp16": {"enabled": False, "loss_scale": "dynamic"}}, r"fp16\.loss_scale: fp16\.loss_scale must be a number"),
    ({"communication_data_type": "fp33"}, r"communication_data_type: Invalid communication_data_type"),
    ({"amp": {"enabled": True}}, r"amp: .*removed"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}},
     r"DeepSpeed 0\.19\.8 refuses this config: bfloat16 and fp16 modes cannot be simultaneously enabled"),
]


@pytest.mark.parametrize("ds, message", DEEPSPEED_REFUSES)
def test_what_deepspeed_refuses_is_one_line_naming_the_file_and_key(ds, message):
    from jrcl_fast.engine.backends import deepspeed_check

    user = {"bf16": {"enabled": False}, **ds}
    with pytest.raises(Exception) as raw:  # what DeepSpeed itself raises: not a UserError
        from deepspeed.runtime.config import DeepSpeedConfig

        DeepSpeedConfig({"train_micro_batch_size_per_gpu": 4, **user})
    assert not isinstance(raw.value, UserError)
    batch = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8}  # 2 ranks
    with pytest.raises(UserError, match=r"^user_ds\.json: " + message) as err:
        deepspeed_check({**user, **batch}, "user_ds.json")
    assert "\n" not in str(err.value)


def test_deepspeed_check_runs_before_the_ranks_meet(tmp_path, digits_root, monkeypatch):
    """build_engine refuses the config before the process group (where ranks wait on
    each other) is started."""
    from jrcl_fast.config import load_config
    from jrcl_fast.engine import backends
    from jrcl_fast.engine.optim import build_optimizer, build_scheduler
    from jrcl_fast.models import JRCLNet
    from jrcl_fast.runtime import Ranks

    def never(*args):
        raise AssertionError("the process group started before the config was checked")

    monkeypatch.setattr(backends, "init_process_group", never)
    cfg = load_config(user_config(tmp_path, digits_root, {"zero_optimization": {"stage": 1, "stgae": 2}},
                                  engine="deepspeed"))
    model = JRCLNet(cfg.model, 10)
    optimizer = build_optimizer(cfg.optim, model)
    with pytest.raises(UserError, match=r"zero_optimization\.stgae: Extra inputs are not permitted"):
        backends.build_engine(cfg, Ranks(0, 2, 0), CPU, model, optimizer, build_scheduler(cfg.optim, optimizer, 10, 1))


# ---------------------------------------------------------------- keys filled in

@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_needed_keys_are_filled_and_named(tmp_path, digits_root, stage, precision):
    bf16 = precision == "bf16"
    ds, note = built(tmp_path, digits_root, {"bf16": {"enabled": bf16}, "zero_optimization": {"stage": stage}})
    expected = {}
    if stage:
        expected["zero_allow_untested_optimizer"] = True
    if bf16:
        expected["communication_data_type"] = "fp32"
    if bf16 and stage:
        expected["data_types"] = {"grad_accum_dtype": "fp32"}
    assert {key: ds[key] for key in expected} == expected
    assert not ({"zero_allow_untested_optimizer", "communication_data_type", "data_types"} - expected.keys()) & ds.keys()
    if expected:
        assert note.startswith(f"filled in for {tmp_path / 'user_ds.json'}: ")
        assert len(note.split(", ")) == len(expected) and "\n" not in note
    else:
        assert note == ""


def test_what_the_user_set_is_kept(tmp_path, digits_root):
    ds, note = built(tmp_path, digits_root, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                             "zero_allow_untested_optimizer": True, "communication_data_type": "bf16",
                                             "data_types": {"grad_accum_dtype": "bf16", "buffer_dtype": "bf16"}})
    assert ds["communication_data_type"] == "bf16" and ds["data_types"] == {"grad_accum_dtype": "bf16",
                                                                            "buffer_dtype": "bf16"}
    assert note == ""
    ds, note = built(tmp_path, digits_root, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
                                             "data_types": {"buffer_dtype": "bf16"}})
    assert ds["data_types"] == {"buffer_dtype": "bf16", "grad_accum_dtype": "fp32"}
    assert 'data_types.grad_accum_dtype="fp32"' in note


@pytest.mark.parametrize("name", ["ds_config.json", "ds_config_fp16.json", "ds_config_fp32.json"])
def test_the_shipped_configs_need_nothing_filled(name):
    from jrcl_fast.engine.backends import fill_required_keys

    ds = json.loads((REPO / "configs" / name).read_text())
    assert fill_required_keys(ds, name, ds["zero_optimization"]["stage"]) == (ds, "")


def test_a_user_json_at_zero_stage_1_without_the_untested_optimizer_key_trains(tmp_path, digits_root):
    """The case that ended in DeepSpeed's AssertionError: bf16, ZeRO stage 1, no
    zero_allow_untested_optimizer, through the real engine (one CPU rank). The log says
    what was filled, and the engine itself reports fp32 gradient accumulation and all-reduce.
    ResNet-32: a CPU without bf16 instructions trained ResNet-18 here for almost 5 minutes."""
    config = user_config(tmp_path, digits_root, {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1},
                                                 "steps_per_print": 1000000},
                         model={"backbone": "resnet32"}, engine="deepspeed", epochs=1, threads=1)
    done = run_cli("train", "--config", str(config), env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = " ".join(done.stdout.split())  # rich wraps long lines
    assert re.search(r"DeepSpeed, 1 rank\(s\), bf16, ZeRO stage 1, gradients accumulated in fp32, all-reduced in "
                     r"fp32 \(filled in for \S*user_ds\.json: zero_allow_untested_optimizer=true, "
                     r"communication_data_type=\"fp32\", data_types\.grad_accum_dtype=\"fp32\"\)", out), out[:2000]
    (metrics,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(metrics["loss_total"])


def test_deepspeeds_bfloat16_alias_is_read_as_bf16(tmp_path, digits_root):
    ds, note = built(tmp_path, digits_root, {"bfloat16": {"enabled": True}})
    assert ds["bf16"] == {"enabled": True} and "bfloat16" not in ds
    assert note.endswith('communication_data_type="fp32"')
    with pytest.raises(UserError, match="both 'bf16' and 'bfloat16' are set"):
        built(tmp_path, digits_root, {"bfloat16": {"enabled": True}, "bf16": {"enabled": False}})


@pytest.mark.slow
def test_the_shipped_fp32_config_trains_without_the_bf16_warning(tmp_path, digits_root):
    """configs/ds_config_fp32.json, which the slow-bf16 warning and doctor recommend for CPU
    ranks, through the CLI: DeepSpeed in fp32, no such warning, and the model learns (CE
    well below the prior's entropy, several classes above chance)."""
    config = tiny_config(tmp_path, digits_root, model={"backbone": "resnet32", "projection_dim": 16,
                                                       "projection_hidden_dim": 32},
                         train={**TINY_OVERRIDES["train"], "engine": "deepspeed", "device": "cpu", "epochs": 5,
                                "deepspeed_config": str(REPO / "configs" / "ds_config_fp32.json")})
    done = run_cli("train", "--config", str(config), env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DeepSpeed, 1 rank(s), fp32, ZeRO stage 0" in done.stdout and "warning" not in done.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    counts = [row["train_count"] for row in results["per_class"]]
    prior_entropy = -sum(c / sum(counts) * math.log(c / sum(counts)) for c in counts)
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["loss_ce"] < 0.8 * prior_entropy, last
    assert sum(row["accuracy"] > 0.25 for row in results["per_class"]) >= 3, results["per_class"]
