"""The package installs offline, as on a GPU machine without network: pyproject.toml
declares the build system, so `pip install --no-build-isolation --no-deps` uses the
setuptools already installed instead of fetching one."""

from __future__ import annotations

import site
import subprocess
import sys
import zipfile

import pytest
from helpers import REPO

OFFLINE = ["--no-index", "--no-deps", "--no-build-isolation", "--quiet"]


@pytest.fixture
def bare_venv(tmp_path):
    """A fresh environment with Python's bundled pip and setuptools (ensurepip, offline;
    pip 23 here, old enough to take setuptools' legacy `develop` path when a project
    declares no build system, which is what broke on the GPU machine) that also sees
    this environment's packages (torch, ...) but not its install of jrcl_fast."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    (next(venv.glob("lib/python*/site-packages")) / "parent.pth").write_text(site.getsitepackages()[0] + "\n")
    return venv / "bin" / "python"


def test_editable_install_works_offline_from_any_directory(bare_venv, tmp_path):
    done = subprocess.run([str(bare_venv), "-m", "pip", "install", *OFFLINE, "-e", str(REPO)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = subprocess.run([str(bare_venv), "-c", "import jrcl_fast.kernels.o2a as m, jrcl_fast.cli; print(m.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert found.returncode == 0, found.stderr[-2000:]
    assert found.stdout.strip() == str(REPO / "kernels" / "o2a.py")


def test_wheel_builds_offline_with_the_kernels_inside(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", *OFFLINE, "-w", str(tmp_path), str(REPO)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("jrcl_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"jrcl_fast/kernels/o2a.py", "jrcl_fast/kernels/ce_bdc.py", "jrcl_fast/cli.py"} <= set(names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "jrcl-fast = jrcl_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
