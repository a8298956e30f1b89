"""Shared test helpers: a tiny digits-lt config, a CLI runner, and deepspeed launcher runs."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
WORLD = 2  # ranks of the launcher runs

# A few seconds per epoch on 2 CPU cores: 8 px digits, small heads.
TINY_OVERRIDES = {
    "data": {"image_size": 8},
    "model": {"projection_dim": 16, "projection_hidden_dim": 32},
    "train": {"epochs": 3, "batch_size": 32, "threads": 2},
    "optim": {"warmup_epochs": 1},
}


def tiny_config(tmp_path: Path, data_root: Path, base: str = "digits_lt", **sections) -> Path:
    """Write configs/<base>.yaml with the tiny overrides (and `sections`) to tmp_path."""
    from jrcl_fast.config import resolve_paths

    raw = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text())
    resolve_paths(raw, REPO / "configs")  # its relative paths, as read from configs/
    for section, values in {**TINY_OVERRIDES, **sections}.items():
        raw[section].update(values)
    raw["data"]["root"] = str(data_root)
    raw["train"]["output_dir"] = str(tmp_path / "run")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(*args: str, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`jrcl-fast *args` in a fresh process, in this process's environment or `env`."""
    env = {**(os.environ if env is None else env), "COLUMNS": "160"}  # wide enough that table headers do not wrap
    return subprocess.run([sys.executable, "-m", "jrcl_fast", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env)


def tree_digest(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file under `folder`."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- launcher runs (CPU ranks, gloo)

def run_env():
    return {**os.environ, "COLUMNS": "160", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def launcher_cmd(config, *extra, ranks=WORLD, port=None):
    from jrcl_fast.runtime import free_port

    # The launcher's module, not its console script: an environment installed with
    # `pip --target` (as on the GPU machines) has no bin/deepspeed beside python.
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
            "--master_port", str(port or free_port()), "--module", "jrcl_fast", "train", "--config", str(config), *extra]


def launch(config, *extra, timeout=600, port=None):
    return subprocess.run(launcher_cmd(config, *extra, port=port), capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=run_env())


def dist_config(tmp_path, name, ds=None, base="digits_lt", **sections):
    """The tiny config (of configs/<base>.yaml), fp32 group norm, 2 epochs of 16 per rank (32 in
    all; 10 steps on digits-lt), on CPU ranks (gloo) whatever hardware the machine has."""
    folder = tmp_path / name
    folder.mkdir()
    ds_path = folder / "ds.json"
    shipped = json.loads((REPO / "configs" / "ds_config_fp32.json").read_text())
    ds_path.write_text(json.dumps({**shipped, **(ds or {})}))
    train = {"epochs": 2, "batch_size": 16, "threads": 1, "deepspeed_config": str(ds_path), "device": "cpu",
             **sections.pop("train", {})}
    model = {"norm": "group", "projection_dim": 16, "projection_hidden_dim": 32, **sections.pop("model", {})}
    return tiny_config(folder, sections.pop("data_root"), base, model=model, train=train, **sections)


def equivalence_config(tmp_path, name, data_root, ds=None, **train):
    """16 px, plain SGD at a small rate: a smooth trajectory. In a chaotic one (8 px,
    momentum, lr 0.05) rounding differences, such as another summation order or even
    another thread count in one process, grow past any tolerance within 20 steps."""
    return dist_config(tmp_path, name, ds, data_root=data_root, data={"image_size": 16},
                       optim={"lr": 0.0005, "momentum": 0.0, "warmup_epochs": 1}, train=train)


def one_epoch_run(tmp_path: Path, base: str, data_root: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """`jrcl-fast train` on configs/<base>.yaml for one epoch at 8 px, batch 128, small
    heads, the data set in `data_root`: its process and its results.json."""
    import json

    raw = yaml.safe_load((REPO / "configs" / f"{base}.yaml").read_text())
    raw["data"].update(root=str(data_root), image_size=8)
    raw["model"].update(projection_dim=16, projection_hidden_dim=32)
    raw["train"].update(epochs=1, batch_size=128, output_dir=str(tmp_path / "run"), threads=2)
    raw["train"].pop("deepspeed_config")
    raw["optim"]["warmup_epochs"] = 0
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    done = run_cli("train", "--config", str(config))
    assert done.returncode == 0, done.stderr
    return done, json.loads((tmp_path / "run" / "results.json").read_text())


def train_until_killed(cfg, dataset, monkeypatch) -> None:
    """Train `cfg` and stop it right after epoch 1's checkpoint is written, as a kill would."""
    import pytest
    from rich.console import Console

    from jrcl_fast.engine import trainer

    save_epoch = trainer.save_epoch

    def stop_after_epoch_1(run, epochs_done):
        save_epoch(run, epochs_done)
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(trainer, "save_epoch", stop_after_epoch_1)
        with pytest.raises(KeyboardInterrupt):
            trainer.train(cfg, dataset, False, False, Console(quiet=True))
