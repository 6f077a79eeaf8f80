"""The release: `python -m build` makes an sdist and, from it, a wheel; the wheel installs into an empty virtualenv and
its commands run; the metadata has the license and no placeholder; the torch lower bound is stated once and checked."""
import configparser
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(REPO / "settings.ini", encoding="utf-8")
    return cfg["DEFAULT"]


def test_the_torch_lower_bound_is_stated_once_and_checked():
    from llm_scratch.hardware import TORCH_MIN, require_torch
    stated = re.search(r"(?:^|\s)torch>=(\d+)\.(\d+)(?:\s|$)", settings()["requirements"]).groups()
    assert tuple(map(int, stated)) == TORCH_MIN
    with pytest.raises(ImportError, match=r"needs torch 2\.9 or later.*pip install 'torch>=2\.9'"): require_torch("2.8.1")
    require_torch("2.9.0"); require_torch(torch.__version__)


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    "`python -m build`'s output: the sdist, and the wheel it builds from that sdist (not from the working tree)."
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "build", "--outdir", str(out), str(REPO)], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return out


def test_the_sdist_holds_what_building_needs(dist):
    import tarfile
    sdist, = dist.glob("*.tar.gz")
    names = {Path(n).relative_to(Path(n).parts[0]).as_posix() for n in tarfile.open(sdist).getnames() if "/" in n}
    assert {"settings.ini", "setup.py", "LICENSE", "README.md", "llm_scratch/train.py", "llm_scratch/hardware.py"} <= names


def test_the_wheel_metadata_has_the_license_and_no_placeholder(dist):
    wheel, = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        licenses = [n for n in z.namelist() if n.endswith("LICENSE")]
        assert licenses and "Apache License" in z.read(licenses[0]).decode()
        entry_points = z.read(next(n for n in z.namelist() if n.endswith("entry_points.txt"))).decode()
    assert "License-Expression: Apache-2.0" in meta or "License: Apache-2.0" in meta
    assert not re.search(r"example\.(invalid|com|org)|\.example\b", meta), "a placeholder address in the metadata"
    for cmd in ("llm_scratch_train", "llm_scratch_finetune", "llm_scratch_generate"): assert cmd in entry_points


def test_the_wheel_installs_into_an_empty_virtualenv_and_runs_the_commands(dist, tmp_path):
    wheel, = dist.glob("*.whl")
    env = tmp_path / "venv"
    venv.create(env, with_pip=True)  # nothing of this project's .venv is visible in it
    py, pip = env / "bin" / "python", [str(env / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"torch=={torch.__version__.split('+')[0]}"], check=True, timeout=900)  # this machine's build
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)
    for cmd in ("llm_scratch_train", "llm_scratch_generate", "llm_scratch_finetune"):
        p = subprocess.run([str(env / "bin" / cmd), "--help"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
    p = subprocess.run([str(py), "-c", "import llm_scratch, llm_scratch.train; print(llm_scratch.train.__file__)"],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert p.returncode == 0 and str(env) in p.stdout  # the installed copy, not this checkout
