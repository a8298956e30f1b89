"""Config keys that combine into nothing: one-line errors and warnings, and a config
(and `jrcl-fast --help`) that loads without importing torch."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from jrcl_fast.cli import main
from jrcl_fast.config import load_config
from jrcl_fast.errors import ConfigWarning, UserError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DIGITS = CONFIGS / "digits_lt.yaml"  # 30 epochs, 2 of warmup, lambda_con 0.35, 2 views


def test_a_warmup_longer_than_training_is_an_error():
    with pytest.raises(UserError, match=r"digits_lt\.yaml with --set overrides: key 'optim\.warmup_epochs' \(4\) "
                                        r"exceeds 'train\.epochs' \(3\), so the learning rate never reaches optim\.lr"):
        load_config(DIGITS, ["train.epochs=3", "optim.warmup_epochs=4"])


@pytest.mark.parametrize("overrides,message", [
    (["train.epochs=2"], r"'optim\.warmup_epochs' equals 'train\.epochs' \(2\)"),
    (["train.select_on=val_balanced_accuracy", "train.early_stop_patience=30"],
     r"'train\.early_stop_patience' \(30\) is not below 'train\.epochs' \(30\)"),
    (["loss.lambda_con=0"], r"'data\.num_views' is 2 but 'loss\.lambda_con' is 0"),
    (["model.prototypes=classifier", "loss.use_prototypes=false"], r"'model\.prototypes' is classifier"),
    (["loss.bdc_stop_grad=classifier", "loss.lambda_bdc=0"], r"no BDC gradient to stop"),
    (["data.normal_classes=['0']", "loss.lambda_bdc=0", "loss.lambda_bin=0"], r"no loss uses the normal group"),
    (["loss.logit_adjust_tau=1.0", "data.sampler=class_balanced"], r"over-correct"),
    # cRT with the config's auxiliary losses left on: free prototypes, so O2A reaches no trainable weight
    (["train.trainable=classifier", "train.init_from=ce/checkpoints"],
     r"'train\.trainable' is classifier, so 'loss\.lambda_bin', 'loss\.lambda_con' weigh losses whose gradients "
     r"reach only frozen weights"),
    (["train.trainable=classifier", "train.init_from=ce/checkpoints", "loss.lambda_con=0", "data.num_views=1",
      "loss.bdc_stop_grad=classifier"], r"so 'loss\.lambda_bin', 'loss\.lambda_bdc' weigh"),
])
def test_keys_that_do_nothing_together_warn_once(overrides, message):
    with pytest.warns(ConfigWarning, match=message) as caught:
        load_config(DIGITS, overrides)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)


def test_a_classifier_stage_whose_losses_reach_the_classifier_does_not_warn():
    """BDC (not stopped at the classifier) and O2A with prototypes made of the classifier's
    weights both train it: only the binary head's CE is left to switch off."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(DIGITS, ["train.trainable=classifier", "train.init_from=ce/checkpoints", "loss.lambda_bin=0",
                             "model.prototypes=classifier"])


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_without_a_warning(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)
        load_config(config)


def test_the_cli_prints_a_config_warning_as_one_line(tmp_path, capsys):
    code = main(["check-data", "--config", str(DIGITS), "--set", "loss.lambda_con=0",
                 "--set", f"data.root={tmp_path / 'nowhere'}", "--set", "data.name=places_lt"])
    out = capsys.readouterr()
    assert code == 2 and "error:" in out.err
    lines = [line for line in out.out.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1 and "data.num_views" in lines[0] and "Warning" not in out.out + out.err


NO_TORCH = """
import runpy, sys
from pathlib import Path
configs = Path(sys.argv[1])
sys.argv = ["jrcl-fast", "--help"]
try:
    runpy.run_module("jrcl_fast", run_name="__main__")
except SystemExit as done:
    assert done.code == 0, done.code
assert "torch" not in sys.modules, "jrcl-fast --help imported torch"
from jrcl_fast.config import load_config
for config in sorted(configs.glob("*.yaml")):
    load_config(config)
    assert "torch" not in sys.modules, f"loading {config} imported torch"
print("ok")
"""


def test_help_and_config_loading_import_no_torch():
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(CONFIGS)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr
    assert "usage: jrcl-fast" in done.stdout
