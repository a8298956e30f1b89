"""benchmarks/kernel_sass.py keeps running: a tiny problem through the real compiler,
checking the JSON's schema and that the totals are what its rows add up to. The
figures themselves are static facts of one Triton version (docs/BENCHMARKS.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

pytestmark = pytest.mark.slow  # compiles four kernels with ptxas (~15 s on 2 cores)

FIELDS = {"name", "registers", "spill_bytes", "smem_bytes", "wgmma", "ldg128", "instructions_per_element",
          "instructions_per_normal_class"}


def test_kernel_sass_writes_one_row_per_kernel_and_loss(tmp_path: Path) -> None:
    out = tmp_path / "sass.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "kernel_sass.py"), "--n", "96", "--classes", "20", "--dim", "32",
         "--json", str(out)], capture_output=True, text=True, cwd=REPO, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(out.read_text())["kernels"]}
    assert all(set(row) == FIELDS for row in rows.values())
    for loss in ("o2a", "ce_bdc"):
        passes = [row for name, row in rows.items() if name.startswith(f"{loss}") and name != f"{loss}_total"]
        total = rows[f"{loss}_total"]
        assert passes and all(row["instructions_per_element"] > 0 and row["registers"] > 0 for row in passes)
        assert total["instructions_per_element"] == pytest.approx(sum(r["instructions_per_element"] for r in passes))
        assert total["spill_bytes"] == sum(r["spill_bytes"] for r in passes)
        assert total["registers"] == max(r["registers"] for r in passes)
    assert rows["o2a_total"]["wgmma"] is True  # bf16 dots run on the tensor cores
