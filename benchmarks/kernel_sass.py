"""Machine code of the fused loss kernels for an H100 (sm_90), read without a GPU.

Compiles every Triton kernel of the O2A and CE+BDC losses at the benchmark shapes
with Triton's bundled ptxas, specialised as a launch would be (16-byte aligned
pointers, integers divisible by 16 marked so), and reports per kernel: registers,
spill bytes, shared memory, whether wgmma (HGMMA) appears, whether the main loop
loads and stores global memory in 128-bit vectors, and the SASS instructions of the main loop per element it covers
(one similarity a_i.k_j for O2A, one logit for CE+BDC), counted per thread: the
loop's instructions times the CTA's threads over the elements of one iteration. A `*_total` row per loss
sums the instructions over the passes a training step runs.

    python benchmarks/kernel_sass.py                         # bf16, N = 16,384, C = 8,142, D = 128
    python benchmarks/kernel_sass.py --dtype fp32 --json sass.json

Static figures: they say what each element costs to issue, not how fast it runs.
docs/BENCHMARKS.md records them. Loops = the maximal ranges of code closed by a
backward branch; each kernel names the role of each of its loops, in program order
(`KernelSpec.loop_roles`). Main loop = the loops over all elements: their instruction
count (NOPs excluded) over the elements one iteration covers. O2A's half-precision tiles
run each pass as three loops over the blocks of the other side: before the diagonal, the
one or two blocks that hold it (which mask each anchor's own key), after it; the
off-diagonal loops are one and the same code, and the first is counted, since they
cover all but two blocks of a row. Its other tiles run one loop, which masks. The O2A
forward is compiled as training runs it, against each anchor's fixed reference
(o2a.fixed_references; `FIXED_REF`), not as its online fallback.
CE+BDC's loops over its normal classes alone (gathered from their list, after each
pass's loop over all classes) are counted apart, per normal class: a row of C classes,
n of them normal, costs C x instr / element + n x instr / normal class (rounded up to
the classes one iteration covers, 512 a row).
"""

from __future__ import annotations

import os

# Real compilation: the kernels must not be built as interpreted functions, which
# TRITON_INTERPRET (set by the test suite) decides when they are imported.
os.environ["TRITON_INTERPRET"] = "0"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import triton  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
ELEMENT_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass(frozen=True)
class KernelSpec:
    """One kernel as a launch would compile it. `args` gives each runtime argument a
    pointer type ("*bf16") or a representative value (an int or float), from which the
    signature and the launcher's divisibility-by-16 specialisation follow."""

    name: str  # row name
    module: str
    kernel: str
    args: dict[str, str | int | float]
    constexprs: dict[str, object]
    num_warps: int
    elements_per_iteration: int  # similarities or logits one main-loop iteration covers
    # The role of each loop, in program order: "main" (counted per element), "normal"
    # (CE+BDC's loops over the normal classes, counted per normal class), or "other"
    # (not counted: O2A's diagonal blocks and the repeat of its off-diagonal loop).
    loop_roles: tuple[str, ...]
    num_stages: int = 3  # Triton's default on sm_90
    normal_classes_per_iteration: int = 0  # the normal classes a "normal" loop iteration covers


@dataclass
class KernelFigures:
    name: str
    registers: int
    spill_bytes: int
    smem_bytes: int
    wgmma: bool
    ldg128: bool
    instructions_per_element: float
    instructions_per_normal_class: float = 0.0


def o2a_specs(n: int, classes: int, dim: int, dtype: str, dot_precision: str = "tf32x3",
              all_tiles: bool = False) -> list[KernelSpec]:
    """The passes of one_to_all_supcon(features, prototypes) in training: the forward
    (keeping the anchors' gradient direction O) and the keys' backward, at the tile a
    launch starts with, or with `all_tiles` at every tile the GPU autotuner may pick."""
    from jrcl_fast.kernels import o2a

    m = n + classes
    args: dict[str, str | int | float] = {
        "a_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "da_ptr": f"*{dtype}", "dk_ptr": f"*{dtype}",
        "ya_ptr": "*i32", "yk_ptr": "*i32",
        "bias_other_ptr": "*fp32", "bias_same_ptr": "*fp32", "ref_ptr": "*fp32", "log2_den_ptr": "*fp32",
        "coef_ptr": "*fp32",
        "o_ptr": "*fp32", "n": n, "M": m, "D": dim, "anchor_offset": 0, "scale": 14.4,
        "stride_a": dim, "stride_k": dim, "stride_o": dim, "stride_dk": dim,
    }
    specs = []
    for pass_name in o2a.PASSES:
        tiles = o2a.tile_candidates(dim, ELEMENT_SIZE[dtype], pass_name)
        for tile in tiles if all_tiles else tiles[:1]:
            constexprs = {"CLASS_AVERAGE": True, "DOT_PRECISION": dot_precision, "BLOCK_D": o2a.block_d(dim),
                          "BLOCK_N": tile["BLOCK_N"], "BLOCK_M": tile["BLOCK_M"],
                          "SPLIT_DIAGONAL": tile["SPLIT_DIAGONAL"]}
            if pass_name == "fwd":  # training: the anchors' gradient comes from the forward's O
                constexprs.update(STORE_O=True, FIXED_REF=True)
            name = f"o2a_{pass_name}" + (f" {tile['BLOCK_N']}x{tile['BLOCK_M']} w{tile['num_warps']} "
                                          f"s{tile['num_stages']}" if all_tiles else "")
            specs.append(KernelSpec(name, "jrcl_fast.kernels.o2a", f"_o2a_{pass_name}_kernel", args, constexprs,
                                    tile["num_warps"], tile["BLOCK_N"] * tile["BLOCK_M"],
                                    ("main", "other", "other") if tile["SPLIT_DIAGONAL"] else ("main",),
                                    tile["num_stages"]))
    return specs


def ce_bdc_specs(n: int, classes: int, dtype: str, stride: int) -> list[KernelSpec]:
    """The training step's CE+BDC kernel: logit-adjusted, Jensen-Shannon, gradient on."""
    from jrcl_fast.kernels import ce_bdc

    config = ce_bdc._launch_config(classes, ELEMENT_SIZE[dtype])
    num_warps = config.pop("num_warps")
    args: dict[str, str | int | float] = {
        "z_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "dz_ptr": f"*{dtype}", "db_ptr": f"*{dtype}",
        "y_ptr": "*i64", "abnormal_bias_ptr": "*fp32", "normal_idx_ptr": "*i32", "n_normal_ptr": "*i32",
        "adj_ptr": "*fp32", "ce_ptr": "*fp32", "bce_ptr": "*fp32", "bdc_ptr": "*fp32",
        "B": n, "C": classes, "stride_z": stride, "stride_b": 2, "stride_dz": stride, "stride_db": 2,
        "lambda_bin": 1.0, "lambda_bdc_z": 1.0, "lambda_bdc_b": 1.0, "inv_batch": 1e-4,
    }
    constexprs = {"HAS_ADJ": True, "SYM_KL": False, "COMPUTE_GRAD": True, **config}
    block = config["BLOCK_C"] * config["ROWS"]
    # Each pass: a loop over all classes, then one over the normal classes' list.
    return [KernelSpec("ce_bdc", "jrcl_fast.kernels.ce_bdc", "_ce_bdc_kernel", args, constexprs, num_warps, block,
                       ("main", "normal", "main", "normal"),
                       normal_classes_per_iteration=config["NORMAL_BLOCK"] * config["ROWS"])]


def compile_sm90(spec: KernelSpec) -> triton.compiler.CompiledKernel:
    """triton.compile for sm_90 with the signature, constants and divisibility
    attributes that Triton's launcher derives from these arguments."""
    fn = getattr(importlib.import_module(spec.module), spec.kernel)
    if isinstance(fn, Autotuner):  # the JIT function under it
        fn = fn.fn
    signature, constexprs, attrs = {}, dict(spec.constexprs), {}
    for index, arg in enumerate(fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
            continue
        value = spec.args[arg]
        if isinstance(value, str):  # a pointer: torch allocations are 16-byte aligned
            signature[arg], attrs[(index,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[arg] = "fp32"
        elif value == 1:  # the launcher turns an int 1 into a constant
            signature[arg], constexprs[arg] = "constexpr", 1
        else:
            signature[arg] = "i32"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=TARGET, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers, spill bytes = stores + loads) from ptxas -v, run with the options
    Triton's backend passes (the register allocator level of its ptxas 13 workaround)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run(
            [str(TOOLS / "ptxas"), "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", str(src),
             "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True, text=True, check=True,
        )
    log = done.stdout + done.stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return registers, spills


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.+?)\s*;")


def sass_instructions(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction text without predicate) of the kernel's SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(TOOLS / "cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return [(int(address, 16), re.sub(r"^@!?U?P\w+\s+", "", body)) for address, body in _SASS_LINE.findall(text)]


def loops(instructions: list[tuple[int, str]]) -> list[list[str]]:
    """The instructions (NOPs excluded) of each maximal backward-branch range, in
    program order."""
    ranges: list[tuple[int, int]] = []
    for address, text in instructions:
        target = re.match(r"BRA(?:\.\S+)?\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < address:  # not the trailing self-branch
            lo = int(target.group(1), 16)  # an outer loop takes in the loops inside it
            ranges = [r for r in ranges if not lo <= r[0] <= address] + [(lo, address)]
    return [[text for address, text in instructions if lo <= address <= hi and not text.startswith("NOP")]
            for lo, hi in sorted(ranges)]


def figures(spec: KernelSpec) -> tuple[KernelFigures, str, str]:
    """The row of one kernel, and its main loop's 128-bit global loads and stores as
    "vector of all" counts for the table (a loop can mix vector and scalar loads)."""
    compiled = compile_sm90(spec)
    registers, spills = ptxas_usage(compiled.asm["ptx"])
    instructions = sass_instructions(compiled.asm["cubin"])
    all_loops = loops(instructions)
    if len(all_loops) != len(spec.loop_roles):
        raise RuntimeError(f"{spec.name}: expected {len(spec.loop_roles)} loops {spec.loop_roles}, "
                           f"found {len(all_loops)}: update its KernelSpec.loop_roles")
    loop, normal = ([text for role, body in zip(spec.loop_roles, all_loops) if role == wanted for text in body]
                    for wanted in ("main", "normal"))
    # Vector width is judged in the main loop, where the bulk of the bytes move; cp.async
    # (LDGSTS) is how Triton's pipeliner loads global memory into shared memory.
    loop_opcodes = [text.split()[0] for text in loop]
    loads = [op for op in loop_opcodes if op.startswith(("LDG.", "LDGSTS."))]
    stores = [op for op in loop_opcodes if op.startswith("STG.")]
    wide_loads = sum(".128" in op for op in loads)
    wide_stores = sum(".128" in op for op in stores)
    row = KernelFigures(
        name=spec.name,
        registers=registers,
        spill_bytes=spills,
        smem_bytes=int(compiled.metadata.shared),
        wgmma=any(text.startswith("HGMMA") for _, text in instructions),
        ldg128=wide_loads > 0,
        # Every thread of the CTA issues the loop once per iteration: lane-instructions per element.
        instructions_per_element=len(loop) * spec.num_warps * 32 / spec.elements_per_iteration,
        instructions_per_normal_class=(len(normal) * spec.num_warps * 32 / spec.normal_classes_per_iteration
                                       if normal else 0.0),
    )
    return row, f"{wide_loads}/{len(loads)}", f"{wide_stores}/{len(stores)}"


def total(name: str, rows: list[KernelFigures]) -> KernelFigures:
    """A loss over its passes: instructions summed, the worst registers and shared
    memory, all spills, wgmma in any pass, 128-bit loads in every pass."""
    return KernelFigures(
        name=name,
        registers=max(r.registers for r in rows),
        spill_bytes=sum(r.spill_bytes for r in rows),
        smem_bytes=max(r.smem_bytes for r in rows),
        wgmma=any(r.wgmma for r in rows),
        ldg128=all(r.ldg128 for r in rows),
        instructions_per_element=sum(r.instructions_per_element for r in rows),
        instructions_per_normal_class=sum(r.instructions_per_normal_class for r in rows),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(ELEMENT_SIZE), default="bf16")
    parser.add_argument("--n", type=int, default=16384, help="features (O2A anchors) and CE+BDC rows")
    parser.add_argument("--classes", type=int, default=8142)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--logit-stride", type=int, default=None,
                        help="row stride of the logits in elements (default: the class count)")
    parser.add_argument("--dot-precision", choices=("tf32x3", "ieee"), default="tf32x3",
                        help="O2A's float32 dots (half precision ignores it)")
    parser.add_argument("--candidates", action="store_true",
                        help="O2A only, one row per tile the GPU autotuner may pick (the first of each pass is the "
                             "tile a launch starts with), no totals")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()

    stride = args.logit_stride or args.classes
    losses = {"o2a": o2a_specs(args.n, args.classes, args.dim, args.dtype, args.dot_precision, args.candidates)}
    if not args.candidates:
        losses["ce_bdc"] = ce_bdc_specs(args.n, args.classes, args.dtype, stride)
    rows, vectors = [], {}
    for loss, specs in losses.items():
        passes = []
        for spec in specs:
            row, *vectors[spec.name] = figures(spec)
            passes.append(row)
        rows += passes if args.candidates else [*passes, total(f"{loss}_total", passes)]

    console = Console(width=None if sys.stdout.isatty() else 140)
    table = Table(title=f"sm_90 SASS ({args.dtype}, N = {args.n}, C = {args.classes}, D = {args.dim}, "
                        f"logit stride {stride}; triton {triton.__version__})")
    columns = ("kernel", "registers", "spill B", "smem B", "wgmma", "loop loads 128-bit", "loop stores 128-bit",
               "instr / element", "instr / normal class")
    for column in columns:
        table.add_column(column, justify="left" if column == "kernel" else "right")
    for r in rows:
        loads, stores = vectors.get(r.name, ("yes" if r.ldg128 else "no", "-"))
        table.add_row(r.name, str(r.registers), str(r.spill_bytes), str(r.smem_bytes), "yes" if r.wgmma else "no",
                      loads, stores, f"{r.instructions_per_element:.1f}",
                      f"{r.instructions_per_normal_class:.1f}" if r.instructions_per_normal_class else "-")
    console.print(table)
    if args.json:
        args.json.write_text(json.dumps({"kernels": [asdict(r) for r in rows]}, indent=1))
        console.print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
