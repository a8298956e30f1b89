"""Whether bf16 pays on this CPU: one measurement for `jrcl-fast doctor` and the trainer.

Where the CPU has bf16 instructions (AVX-512 BF16, AMX) CPU ranks trained 1.5x faster in
bf16 than in fp32; without them (an AVX2 CPU) oneDNN runs bf16 convolutions on its
reference path, 18-73x slower than fp32 (docs/PRECISION.md). A 64-channel convolution
timed on one thread tells the two apart in under a second, while other work runs too.
"""

from __future__ import annotations

import time
import warnings

import torch
import torch.nn.functional as F

from jrcl_fast.errors import ConfigWarning

# bf16 convolutions may be this much slower than fp32 before a CPU run in bf16 is a mistake.
CPU_BF16_SLOWDOWN_LIMIT = 3.0
# The start of the trainer's warning, which doctor leaves out (it is doctor's own check).
SLOW_BF16_WARNING = "trains CPU ranks in bf16"


def conv_seconds(dtype: torch.dtype) -> float:
    """Best of three forward + backward passes of a 64-channel 3x3 convolution (ResNet-32's
    widest) over a batch of 8 x 8 maps, on the CPU."""
    images = torch.randn(32, 64, 8, 8, dtype=dtype, requires_grad=True)
    weight = torch.randn(64, 64, 3, 3, dtype=dtype, requires_grad=True)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        F.conv2d(images, weight, padding=1).float().sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def bf16_verdict(world_size: int = 1) -> tuple[bool, str]:
    """Whether bf16 pays on this CPU, and the measurement in words; where it does not, with
    the fp32 settings for a job of `world_size` ranks. Timed on one thread (as each CPU rank
    of a launch on few cores), leaving the caller's thread count and random state as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            slowdown = conv_seconds(torch.bfloat16) / conv_seconds(torch.float32)
    finally:
        torch.set_num_threads(threads)
    note = (f"bf16 convolutions take {slowdown:.1f}x fp32's time "
            f"(CPU capability {torch.backends.cpu.get_cpu_capability()})")
    if slowdown <= CPU_BF16_SLOWDOWN_LIMIT:
        return True, note
    one_process = ", or train.engine=local" if world_size == 1 else ""
    return False, (f"{note}; train CPU ranks in fp32 with a DeepSpeed config that sets \"bf16\": "
                   f"{{\"enabled\": false}}, such as configs/ds_config_fp32.json (train.deepspeed_config){one_process}")


def warn_if_bf16_is_slow(config_name: str, world_size: int) -> None:
    """A ConfigWarning, before the first step, when `config_name` asks for bf16 on CPU ranks
    and this CPU runs it over CPU_BF16_SLOWDOWN_LIMIT times slower than fp32."""
    pays, note = bf16_verdict(world_size)
    if not pays:
        warnings.warn(f"{config_name} {SLOW_BF16_WARNING}, and on this CPU {note}", ConfigWarning, stacklevel=2)
