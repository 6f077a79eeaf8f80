"""The book's GPT-2 cells on both paths: where the weights cannot be reached they print one line and the notebook
goes on; where they can (here a small checkpoint in the Hugging Face layout stands in for GPT-2, through
$LLM_SCRATCH_GPT2), they run and show the model's output."""
import ast
import builtins
import os
import symtable
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


def reads_and_defines(source: str) -> tuple[set[str], set[str]] | None:
    "The global names a cell reads but does not define, and those it defines; None if it cannot tell (magics, star imports)."
    code = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    try: table = symtable.symtable(code, "cell", "exec")
    except SyntaxError: return None
    if any(isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(ast.parse(code))): return None
    defines = {s.get_name() for s in table.get_symbols() if s.is_assigned() or s.is_imported()}
    reads = {s.get_name() for s in table.get_symbols() if s.is_referenced()} - defines
    def nested(t):  # functions and classes of the cell read globals when called
        for child in t.get_children():
            reads.update(s.get_name() for s in child.get_symbols() if s.is_referenced() and s.is_global())
            nested(child)
    nested(table)
    return reads - set(dir(builtins)) - defines, defines


def cells_for(cells: list, targets: set[int]) -> set[int]:
    "The indices of the code cells the `targets` cells need: each earlier cell that defines a name a needed cell reads."
    needed, wanted = set(targets), set()
    for i in sorted(targets): wanted |= (reads_and_defines(cells[i].source) or (set(), set()))[0]
    for i in range(max(targets) - 1, -1, -1):
        if cells[i].cell_type != "code" or i in needed: continue
        rd = reads_and_defines(cells[i].source)
        if rd is None or rd[1] & wanted: needed.add(i); wanted |= rd[0] if rd else set()
    return needed


def test_cells_for_follows_the_names_a_cell_reads():
    from types import SimpleNamespace as C
    cells = [C(cell_type="code", source=s) for s in ("import torch\nfrom pathlib import Path", "slow = train()",
             "x = torch.ones(2)", "def f(): return x + 1", "%matplotlib inline\ny = f()", "from fastcore.test import *",
             "z = y * 2\nprint(z)")]
    test = cells_for(cells, {6})
    assert test == {0, 2, 3, 4, 5, 6}, test  # not the slow cell 1, which defines nothing cell 6 needs


def run_notebook(name: str, env: dict) -> list[tuple[str, str]]:
    "Run a chapter's GPT-2 cells, and the cells they need, as the book build does (eval: false cells skipped); each one's source and output."
    from execnb.nbio import read_nb
    from execnb.shell import CaptureShell
    nb = read_nb(REPO / "nbs" / name)
    is_gpt2 = lambda c: c.cell_type == "code" and "pretrained_gpt2(" in c.source and "#| export" not in c.source
    runs = cells_for(nb.cells, {i for i, c in enumerate(nb.cells) if is_gpt2(c)})
    skip = {id(c) for i, c in enumerate(nb.cells) if i not in runs or "#| eval: false" in c.source}
    old = dict(os.environ)
    os.environ.update(env)
    cwd, path = os.getcwd(), list(sys.path)
    try:
        os.chdir(REPO / "nbs")
        sys.path.insert(0, str(REPO / "nbs"))  # as a Jupyter kernel started there has it: `import diagrams` works
        CaptureShell().run_all(nb, exc_stop=True, preproc=lambda c: id(c) in skip)
    finally:
        os.chdir(cwd); os.environ.clear(); os.environ.update(old); sys.path[:] = path
    def text(c): return "".join(o.get("text", "") if isinstance(o.get("text", ""), str) else "".join(o["text"])
                                for o in c.get("outputs", []))
    return [(c.source, text(c)) for c in nb.cells if is_gpt2(c)]


@pytest.mark.parametrize("name", ["04_weights.ipynb", "06_generate.ipynb", "10_instruct.ipynb"])  # 09, 11: as 04 and 06
def test_gpt2_cells_run_when_the_weights_can_be_reached(name, stand_in, tmp_path):
    folder, _ = stand_in
    with_weights = run_notebook(name, {"LLM_SCRATCH_GPT2": str(folder)})
    assert with_weights and all(out.strip() and UNREACHABLE not in out for _, out in with_weights), with_weights
