"""Shared pytest set-up: the offline data mirror and a throw-away cache for every test session."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests explore new random examples on every run; CI (.ci/run sets HYPOTHESIS_PROFILE=ci) replays a
# fixed sequence instead, so that a red run can be re-run and a landing never waits on the dice.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

REPO = Path(__file__).resolve().parents[1]
# The canonical files sit in ../shared/data beside the clone (CI and this project's machines).
_MIRROR = REPO.parent / "shared" / "data"
if "LLM_SCRATCH_DATA" not in os.environ and _MIRROR.is_dir():
    os.environ["LLM_SCRATCH_DATA"] = str(_MIRROR)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    "An empty cache folder, used by `fetch` for this test only."
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(cache))
    return cache



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    "The environment of multi-process runs: one token cache per test module, CPU-only accelerate, the fast malloc."
    e = dict(os.environ, LLM_SCRATCH_CACHE=str(tmp_path_factory.mktemp("cache")), ACCELERATE_USE_CPU="1",
             MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="100000000000", PYTHONHASHSEED="0")
    e.pop("OMP_NUM_THREADS", None)  # accelerate gives each CPU process its share of the cores
    return e


def kill_tree(p: subprocess.Popen):
    "`kill -9` the launcher and every process under it (torch's launcher starts each worker in a session of its own)."
    import psutil
    try: root = psutil.Process(p.pid); procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess: return  # the launcher has already exited: nothing of it is left to kill
    for q in procs:
        try: q.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess: pass
    psutil.wait_procs(procs, timeout=30)


def launch_command(module: str, args, nproc: int = 1, launcher: str = "accelerate") -> list[str]:
    "The command line that runs `python -m module args` in `nproc` CPU processes, under accelerate or torchrun."
    from llm_scratch.distributed import free_port
    if nproc == 1: return [sys.executable, "-m", module, *args]
    if launcher == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(free_port()), "-m", module, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


def rewound_copy(run: Path, dest: Path, step: int) -> Path:
    "A copy of the finished run folder `run` as it stood at checkpoint `step`: later checkpoints and final outputs gone."
    shutil.copytree(run, dest)
    for name in ("final", "run.json", "results.json", "loss.png"):
        if (dest / name).exists(): (shutil.rmtree if (dest / name).is_dir() else Path.unlink)(dest / name)
    for ck in (dest / "checkpoints").glob("step_*"):
        if int(ck.name.removeprefix("step_")) > step: shutil.rmtree(ck)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:06d}")
    return dest
