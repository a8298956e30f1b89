"""Config keys that are each valid but together do nothing, or less than they ask.

Each check is one small function of the whole Config returning its message or None:
an error when the run could not do what the config says (a warmup longer than the
training), a warning when a key is merely ignored. `check_combinations` runs them all
from config.parse_config; a new check is one function added to ERRORS or WARNINGS.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from jrcl_fast.errors import ConfigWarning, UserError

if TYPE_CHECKING:  # config.py imports this module: the type only, so no import circle
    from jrcl_fast.config import Config

Check = Callable[["Config"], "str | None"]


def warmup_outlasts_training(cfg: Config) -> str | None:
    if cfg.optim.warmup_epochs > cfg.train.epochs:
        return (f"key 'optim.warmup_epochs' ({cfg.optim.warmup_epochs}) exceeds 'train.epochs' "
                f"({cfg.train.epochs}), so the learning rate never reaches optim.lr; lower the warmup or train longer")
    return None


def classifier_stage_without_features(cfg: Config) -> str | None:
    if cfg.train.trainable == "classifier" and cfg.train.init_from is None:
        return ("key 'train.trainable' classifier retrains the classifier on another run's features; "
                "set train.init_from to that run's checkpoints/ folder")
    return None


def warmup_is_the_whole_run(cfg: Config) -> str | None:
    if 0 < cfg.optim.warmup_epochs == cfg.train.epochs:
        return (f"key 'optim.warmup_epochs' equals 'train.epochs' ({cfg.train.epochs}): optim.lr is reached at "
                "the last step and the cosine decay never runs; lower the warmup or train longer")
    return None


def patience_outlasts_training(cfg: Config) -> str | None:
    if cfg.train.early_stop_patience >= cfg.train.epochs:
        return (f"key 'train.early_stop_patience' ({cfg.train.early_stop_patience}) is not below 'train.epochs' "
                f"({cfg.train.epochs}), so early stopping can never trigger; lower it or set it to 0")
    return None


def extra_views_unused(cfg: Config) -> str | None:
    if cfg.loss.lambda_con == 0 and cfg.data.num_views > 1:
        return (f"key 'data.num_views' is {cfg.data.num_views} but 'loss.lambda_con' is 0: only the first view "
                "is trained on and the others are decoded for nothing; set data.num_views=1")
    return None


def prototype_head_unused(cfg: Config) -> str | None:
    if cfg.model.prototypes == "classifier" and not (cfg.loss.lambda_con and cfg.loss.use_prototypes):
        return ("key 'model.prototypes' is classifier but the contrastive loss uses no prototypes "
                "(loss.lambda_con is 0 or loss.use_prototypes false): the prototype head trains for nothing")
    return None


def bdc_stop_grad_unused(cfg: Config) -> str | None:
    if cfg.loss.bdc_stop_grad != "none" and cfg.loss.lambda_bdc == 0:
        return (f"key 'loss.bdc_stop_grad' is {cfg.loss.bdc_stop_grad} but 'loss.lambda_bdc' is 0: "
                "there is no BDC gradient to stop")
    return None


def normal_group_unused(cfg: Config) -> str | None:
    if cfg.data.normal_classes is not None and cfg.loss.lambda_bdc == 0 and cfg.loss.lambda_bin == 0:
        return ("key 'data.normal_classes' is set but 'loss.lambda_bdc' and 'loss.lambda_bin' are 0: "
                "no loss uses the normal group")
    return None


def double_rebalancing(cfg: Config) -> str | None:
    if cfg.loss.logit_adjust_tau > 0 and cfg.data.sampler == "class_balanced":
        return ("keys 'loss.logit_adjust_tau' > 0 and 'data.sampler' class_balanced both correct for the class "
                "prior, so together they over-correct towards the tail; use one (Menon et al. 2021 use "
                "instance sampling)")
    return None


def losses_on_frozen_heads(cfg: Config) -> str | None:
    if cfg.train.trainable != "classifier":
        return None
    frozen_only = [key for key, reaches_frozen_only in (
        ("loss.lambda_bin", cfg.loss.lambda_bin > 0),  # the binary head's CE
        ("loss.lambda_con", cfg.loss.lambda_con > 0  # reaches the classifier only through prototypes made of it
         and not (cfg.model.prototypes == "classifier" and cfg.loss.use_prototypes)),
        ("loss.lambda_bdc", cfg.loss.lambda_bdc > 0 and cfg.loss.bdc_stop_grad == "classifier"),
    ) if reaches_frozen_only]
    if frozen_only:
        return (f"key 'train.trainable' is classifier, so {', '.join(repr(k) for k in frozen_only)} weigh losses "
                "whose gradients reach only frozen weights: they train nothing and cost time; set them to 0")
    return None


ERRORS: tuple[Check, ...] = (warmup_outlasts_training, classifier_stage_without_features)
WARNINGS: tuple[Check, ...] = (warmup_is_the_whole_run, patience_outlasts_training, extra_views_unused,
                               prototype_head_unused, bdc_stop_grad_unused, normal_group_unused, double_rebalancing,
                               losses_on_frozen_heads)


def check_combinations(cfg: Config, source: str) -> None:
    """Raise the first error of ERRORS as a UserError; warn (ConfigWarning) for each of WARNINGS."""
    for check in ERRORS:
        if (message := check(cfg)) is not None:
            raise UserError(f"{source}: {message}")
    for check in WARNINGS:
        if (message := check(cfg)) is not None:
            warnings.warn(f"{source}: {message}", ConfigWarning, stacklevel=3)
