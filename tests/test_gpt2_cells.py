"""The book's GPT-2 cells on both paths: where the weights cannot be reached they print one line and the notebook
goes on; where they can (here a small checkpoint in the Hugging Face layout stands in for GPT-2, through
$LLM_SCRATCH_GPT2), they run and show the model's output."""
import os
import sys
from pathlib import Path

import pytest
import torch

from llm_scratch import weights
from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.weights import Checkpoint, pretrained_gpt2, save_gpt2

REPO = Path(__file__).resolve().parents[1]
UNREACHABLE = "cannot be reached from this machine"


@pytest.fixture
def stand_in(tmp_path):
    "A folder with a small model saved as gpt2-small in the Hugging Face layout."
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0)).eval()
    save_gpt2(model, tmp_path / "gpt2" / "gpt2-small")
    return tmp_path / "gpt2", model


def test_unreachable_weights_print_one_line_and_return_none(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path))  # a mirror without the weights
    monkeypatch.delenv("LLM_SCRATCH_GPT2", raising=False)
    ck = weights.GPT2_CHECKPOINTS["gpt2-small"]
    monkeypatch.setitem(weights.GPT2_CHECKPOINTS, "gpt2-small",
                        Checkpoint(ck.preset, "http://127.0.0.1:9/model.safetensors", ck.sha256))  # nothing listens
    assert pretrained_gpt2("gpt2-small") is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and UNREACHABLE in out and "gpt2-weights/gpt2-small/model.safetensors" in out


def test_a_local_checkpoint_folder_is_used(stand_in, monkeypatch):
    folder, model = stand_in
    monkeypatch.setenv("LLM_SCRATCH_GPT2", str(folder))
    loaded = pretrained_gpt2("gpt2-small")
    x = torch.randint(0, 50257, (1, 9))
    with torch.no_grad(): assert torch.equal(loaded(x), model(x))


def run_notebook(name: str, env: dict) -> list[tuple[str, str]]:
    "Run a chapter's notebook as the book build does (eval: false cells skipped); each GPT-2 cell's source and output."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    old = dict(os.environ)
    os.environ.update(env)
    cwd, path = os.getcwd(), list(sys.path)
    try:
        os.chdir(REPO / "nbs")
        sys.path.insert(0, str(REPO / "nbs"))  # as a Jupyter kernel started there has it: `import diagrams` works
        nb = read_nb(REPO / "nbs" / name)
        CaptureShell().run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type != "code" or "#| eval: false" in c.source)
    finally:
        os.chdir(cwd); os.environ.clear(); os.environ.update(old); sys.path[:] = path
    cells = [c for c in nb.cells if c.cell_type == "code" and "pretrained_gpt2(" in c.source and "#| export" not in c.source]
    def text(c): return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                                for o in c.get("outputs", []))
    return [(c.source, text(c)) for c in cells]


@pytest.mark.parametrize("name", ["04_weights.ipynb", "06_generate.ipynb", "10_instruct.ipynb"])  # 09, 11: as 04 and 06
def test_gpt2_cells_run_when_the_weights_can_be_reached(name, stand_in, tmp_path):
    folder, _ = stand_in
    with_weights = run_notebook(name, {"LLM_SCRATCH_GPT2": str(folder)})
    assert with_weights and all(out.strip() and UNREACHABLE not in out for _, out in with_weights), with_weights
