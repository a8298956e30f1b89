"""`jrcl-fast doctor`: the CPU parts run and pass here, every GPU check says skipped,
and a wrong kernel or a crashing check turns into a failure with exit code 1."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report; on a GPU run `jrcl-fast doctor` itself")
def test_doctor_on_a_cpu_machine(tmp_path):
    done = run_cli("doctor", "--out", str(tmp_path / "doctor.json"))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert report["ok"] and report["gpus"] == []
    assert {"python", "torch", "cuda", "cudnn", "nccl", "triton", "dali", "deepspeed"} <= report["versions"].keys()
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status["O2A kernel, float32, small odd"] == status["CE+BDC kernel, float32, small odd"] == "pass"
    assert status["DeepSpeed step, default config (bf16, BatchNorm), CPU"] == "pass"
    assert status["DALI CPU decode"] == "pass"
    assert status["bf16 against fp32 convolutions, CPU"] in {"pass", "warn"}  # this CPU's answer; never a failure
    assert "trains CPU ranks in bf16" not in done.stdout + done.stderr  # the trainer's warning is a row here
    gpu_only = [n for n in status if "C=8142" in n or "bfloat16" in n or "GPU" in n or "NCCL" in n]
    assert len(gpu_only) == 9 and all(status[n] == "skipped" for n in gpu_only)
    assert "skipped" in done.stdout and "No GPU" in done.stdout


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    import jrcl_fast.losses as losses
    from jrcl_fast.doctor import kernel_checks

    exact = losses.one_to_all_supcon

    def off_by_a_percent(*args):
        loss = exact(*args)
        return loss * 1.01 if args[-1] == "triton" else loss

    monkeypatch.setattr(losses, "one_to_all_supcon", off_by_a_percent)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the interpreter only without a GPU
    checks = {c.name: c for c in kernel_checks(device)}
    assert checks["O2A kernel, float32, small odd"].status == "fail"
    assert "max rel. error 1.0e-02" in checks["O2A kernel, float32, small odd"].detail
    assert checks["CE+BDC kernel, float32, small odd"].status == "pass"


def test_a_crashing_check_is_a_failure_and_exit_code_1(monkeypatch, capsys, tmp_path):
    from jrcl_fast import doctor
    from jrcl_fast.cli import main

    def broken():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device")

    monkeypatch.setattr(doctor, "run_checks", lambda device, installed: [doctor.timed("DeepSpeed step", broken),
                                                              doctor.skipped("NCCL all-gather", "needs 2 GPUs")])
    assert main(["doctor", "--out", str(tmp_path / "d.json")]) == 1
    captured = capsys.readouterr()
    assert "a check failed" in captured.err and "Traceback" not in captured.err
    (failed, skipped) = json.loads((tmp_path / "d.json").read_text())["checks"]
    assert failed["status"] == "fail" and "no kernel image" in failed["detail"]
    assert skipped["status"] == "skipped"


@pytest.mark.parametrize("bf16_seconds", [0.5, 2.9, 3.1, 20.0])
def test_slow_bf16_convolutions_are_a_warning_with_advice(monkeypatch, capsys, tmp_path, bf16_seconds):
    """Where bf16 convolutions take over 3x fp32's time (AVX2: 18-73x), doctor warns and
    names the fp32 settings; the machine still passes (exit code 0). Measured on one thread,
    and the caller's thread count is left as it was."""
    from jrcl_fast import doctor
    from jrcl_fast.cli import main
    from jrcl_fast.engine import cpu_bf16

    threads = []
    monkeypatch.setattr(cpu_bf16, "conv_seconds", lambda dtype: threads.append(torch.get_num_threads())
                        or (bf16_seconds if dtype == torch.bfloat16 else 1.0))
    monkeypatch.setattr(doctor, "run_checks", lambda device, installed: [
        doctor.timed("bf16 against fp32 convolutions, CPU", doctor.bf16_verdict, otherwise="warn")])
    before = torch.get_num_threads()
    assert main(["doctor", "--out", str(tmp_path / "d.json")]) == 0
    (check,) = json.loads((tmp_path / "d.json").read_text())["checks"]
    slow = bf16_seconds > 3
    assert check["status"] == ("warn" if slow else "pass") and f"{bf16_seconds:.1f}x fp32's time" in check["detail"]
    assert ('"bf16": {"enabled": false}' in check["detail"] and "configs/ds_config_fp32.json" in check["detail"]) == slow
    assert threads == [1, 1] and torch.get_num_threads() == before
    assert ("warn" in capsys.readouterr().out) == slow
