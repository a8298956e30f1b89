"""The `jrcl-fast` command: train (then evaluate), eval, check-data, prepare-images, doctor."""

from __future__ import annotations

import argparse
import faulthandler
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from jrcl_fast.config import Config, load_config, parse_config
from jrcl_fast.errors import CheckFailure, ConfigWarning, RankFailure, UserError

BAD_LIST_NAME = "bad_images.csv"  # check-data's list of every bad image


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jrcl-fast", description=__doc__)
    # The deepspeed launcher passes --local_rank=N before the subcommand; LOCAL_RANK wins.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train on a data set, then evaluate on its test split")
    train.add_argument("--config", required=True, help="YAML file, e.g. configs/digits_lt.yaml")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set optim.lr=0.1 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run in train.output_dir")
    train.add_argument("--overwrite", action="store_true", help="start over in a train.output_dir that holds a run")

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint on its data set's test split")
    evaluate.add_argument("--checkpoint", required=True, type=Path,
                          help="a run's checkpoints/ folder (its latest epoch), or one epoch folder in it")
    evaluate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a key of the checkpoint's config, e.g. --set data.root=/data/places")
    evaluate.add_argument("--output-dir", type=Path, help="where results go (default: the checkpoint's run folder)")

    check = sub.add_parser("check-data",
                           help="decode every image of the config's data set; list missing or corrupt ones")
    check.add_argument("--config", required=True, help="YAML file, e.g. configs/digits_lt.yaml")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set data.root=/data/nih (repeatable)")
    check.add_argument("--bad-list", type=Path,
                       help=f"CSV of every missing or corrupt image (default: train.output_dir/{BAD_LIST_NAME})")

    prepare = sub.add_parser("prepare-images", help="copy the data set's images to a GPU-decodable format")
    prepare.add_argument("--config", required=True, help="YAML file, e.g. configs/nih_cxr_lt.yaml")
    prepare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set data.root=/data/nih (repeatable)")
    prepare.add_argument("--out", required=True, type=Path, help="folder for the copy; then --set data.root=OUT")
    prepare.add_argument("--format", choices=("jpeg2000", "jpeg"), default="jpeg2000",
                         help="jpeg2000: lossless (GPU runs only: slow on the CPU); jpeg: lossy, at --quality")
    prepare.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    prepare.add_argument("--max-side", type=int, help="shrink so the longer side is at most N px (CXR-LT: 256)")

    doctor = sub.add_parser("doctor", help="check that this machine (GPU, kernels, DeepSpeed, DALI, NCCL) is ready")
    doctor.add_argument("--out", type=Path, help="also write the results as JSON to this file")
    return parser


def _check_loss_backend(cfg: Config) -> None:
    """loss.backend=triton without a GPU fails deep in Triton ("0 active drivers") unless
    the kernels run under the interpreter."""
    from jrcl_fast.kernels._common import interpreter_enabled
    from jrcl_fast.runtime import runs_on_cpu

    if cfg.loss.backend == "triton" and runs_on_cpu(cfg.train.device) and not interpreter_enabled():
        raise UserError("loss.backend=triton needs a CUDA GPU and this run has none; use --set "
                        "loss.backend=torch (or auto, which takes the kernels only on a GPU), or set "
                        "TRITON_INTERPRET=1 to run the kernels under the Triton interpreter (slow)")


def _train(args: argparse.Namespace, console: Console) -> None:
    from jrcl_fast.startup import phase

    # Rank 0 speaks for the job (RANK, as launched_ranks reads it: known before torch loads).
    console.quiet = os.environ.get("RANK", "0") != "0"
    console.print(f"Setting up {args.config}", highlight=False, markup=False)
    cfg = load_config(args.config, args.overrides)  # torch-free: a config mistake is reported at once
    with phase(console, "imports") as shown:
        import torch
        import torch.distributed as dist

        from jrcl_fast.data.catalog import load_dataset
        from jrcl_fast.data.class_groups import ClassGroups
        from jrcl_fast.engine.trainer import train
        from jrcl_fast.evaluation.evaluate import evaluate, evaluate_for_report, publish
        from jrcl_fast.models import JRCLNet
        from jrcl_fast.runtime import launched_ranks

        shown.detail = f"torch {torch.__version__}"
    ranks = launched_ranks(args.local_rank)
    _check_loss_backend(cfg)
    with phase(console, "metadata") as shown:
        dataset = load_dataset(cfg.data)
        shown.detail = dataset.describe()
    groups = ClassGroups(dataset, cfg.data)  # one derivation for the objective and every evaluation

    def validate(model: JRCLNet, device: torch.device) -> float:
        return evaluate(model, dataset, cfg, device, ranks, "val", groups)["balanced_accuracy"]

    model, device, provenance = train(cfg, dataset, args.resume, args.overwrite, console, ranks, validate, groups)
    results = {**evaluate_for_report(model, dataset, cfg, device, ranks, groups), **provenance}
    if ranks.is_main:
        publish(results, Path(cfg.train.output_dir), dataset.name, console)
    if dist.is_initialized():
        dist.barrier()  # no rank tears down its links while another still uses them
        dist.destroy_process_group()


def _eval(args: argparse.Namespace, console: Console) -> None:
    from jrcl_fast.checkpoint import (
        INIT_FROM_KEY,
        REVISION_KEY,
        SELECTION_KEY,
        read_selected_model_states,
        run_dir_of,
    )
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.evaluation.evaluate import evaluate_for_report, publish
    from jrcl_fast.models import JRCLNet, check_architecture
    from jrcl_fast.runtime import Ranks, select_device

    saved = read_selected_model_states(args.checkpoint, "--checkpoint")
    cfg = parse_config(saved["config"], str(args.checkpoint), args.overrides)
    check_architecture(saved.get(REVISION_KEY), cfg.model, f"--checkpoint {args.checkpoint}")
    dataset = load_dataset(cfg.data)
    device = select_device(cfg.train.device, Ranks())
    model = JRCLNet.to_load(cfg.model, dataset.num_classes).to(device)
    model.load_state_dict(saved["module"])  # half-precision runs saved half weights: loaded as fp32
    results = evaluate_for_report(model, dataset, cfg, device)
    if SELECTION_KEY in saved and saved[SELECTION_KEY]["best_epoch"] == saved["epochs_done"]:
        results[SELECTION_KEY] = saved[SELECTION_KEY]  # not for another epoch's folder passed by hand
    if saved.get(INIT_FROM_KEY):
        results[INIT_FROM_KEY] = saved[INIT_FROM_KEY]
    publish(results, args.output_dir or run_dir_of(args.checkpoint), dataset.name, console)


def _check_data(args: argparse.Namespace, console: Console) -> None:
    from jrcl_fast.data.catalog import load_dataset
    from jrcl_fast.data.check_data import check_data
    from jrcl_fast.data.image_formats import format_lines

    cfg = load_config(args.config, args.overrides)
    dataset = load_dataset(cfg.data)
    report = check_data(dataset, console=console)
    bad_list = args.bad_list or Path(cfg.train.output_dir) / BAD_LIST_NAME
    if not report.ok:
        report.write_bad_list(bad_list)
    for line in report.lines(bad_list) + format_lines(report.formats):
        console.print(line, highlight=False, soft_wrap=True, markup=False)
    if not report.ok:
        raise UserError(f"{report.missing:,} missing and {report.corrupt:,} corrupt of {report.checked:,} images "
                        f"(listed in {bad_list}); replace them or remove their entries from the split files")


def _prepare_images(args: argparse.Namespace, console: Console) -> None:
    from jrcl_fast.data.prepare_images import prepare_command

    prepare_command(args.config, args.overrides, args.out, args.format, args.quality, args.max_side, console)


def _doctor(args: argparse.Namespace, console: Console) -> None:
    from jrcl_fast.doctor import doctor

    if not doctor(args.out, console):
        raise CheckFailure("a check failed (listed above); fix it before a long run")


COMMANDS = {"train": _train, "eval": _eval, "check-data": _check_data, "prepare-images": _prepare_images,
            "doctor": _doctor}


def _print_error(err: Exception) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)


def _warnings_on(console: Console) -> None:
    """ConfigWarnings as one line on the console (quiet on ranks other than 0), not
    Python's file:line form; other warnings keep Python's handling."""
    python_way = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if issubclass(category, ConfigWarning):
            console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
        else:
            python_way(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    # A native crash (a segfault; glibc's abort on a corrupted heap) ends a rank with no
    # Python traceback, and the launcher reports only the signal: print every thread's
    # Python stack on the way down, so the log names the line each was in.
    if not faulthandler.is_enabled():
        faulthandler.enable(sys.__stderr__)
    args = _parser().parse_args(argv)
    console = Console()
    with warnings.catch_warnings():  # restores Python's display when main returns
        _warnings_on(console)
        return _run(args, console)


def _run(args: argparse.Namespace, console: Console) -> int:
    try:
        COMMANDS[args.command](args, console)
    except UserError as err:
        _print_error(err)
        return 2
    except RankFailure as err:
        _print_error(err)
        # gloo has no abort (pytorch/gloo#388): destroying links to a dead peer at interpreter
        # exit can itself abort the process (SIGABRT) after the message. The job is over and
        # the message is out, so leave without running those destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except CheckFailure as err:
        _print_error(err)
        return 1
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
