"""A run is never lost, and bad input gets a clear error: damaged checkpoints, data that changed, folders that are
not runs, a diverging loss, files others can read, and every user mistake the commands can meet (exit 2, one line)."""
import errno
import json
import math
import os
import pickle
import shutil
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import llm_scratch.checkpoint as checkpoint_mod
import llm_scratch.metrics as metrics_mod
from llm_scratch.data import fetch
from llm_scratch.metrics import read_metrics
from llm_scratch.checkpoint import (CheckpointDamaged, check_checkpoint, checkpoints, load_trained, prune_checkpoints,
                                    usable_checkpoint)
from llm_scratch.train import Diverged, RunError, TrainConfig, main, train
from llm_scratch.weights import CheckpointError, load_gpt2, save_gpt2


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    "One token cache for this module's runs (the-verdict tokenizes once)."
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(tmp_path_factory.getbasetemp() / "reliability-cache"))


def cfg(out, **kw) -> TrainConfig:
    "A tiny run: 12 steps of 2 windows of 32 tokens, a checkpoint every 4 steps, all three kept."
    base = dict(model="tiny", data="the-verdict", context_length=32, batch_size=2, max_steps=12, save_every=4,
                keep=3, eval_every=6, eval_batches=1, log_every=1, warmup=2, lr=1e-3, out=str(out), progress=False,
                precision="fp32")  # float32: layouts of the same global batch are compared to 1e-5
    return TrainConfig(**{**base, **kw})


def params(model): return torch.cat([p.detach().flatten() for p in model.parameters()])


def snapshot(folder: Path) -> dict:
    "Every file under `folder` with its bytes: to show that nothing changed."
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    "A finished 12-step run with checkpoints at steps 4, 8 and 12: the reference."
    out = tmp_path_factory.mktemp("finished") / "run"
    with pytest.MonkeyPatch.context() as m:
        m.setenv("LLM_SCRATCH_CACHE", str(tmp_path_factory.getbasetemp() / "reliability-cache"))
        train(cfg(out))
    return out


def crashed_copy(finished: Path, to: Path) -> Path:
    "The state a crash during the step-12 checkpoint leaves: no final model, metric lines up to step 12."
    shutil.copytree(finished, to)
    for p in ("final", "run.json", "loss.png"): shutil.rmtree(to / p) if (to / p).is_dir() else (to / p).unlink()
    return to


def shard_of(folder: Path) -> Path: return next(folder.glob("shard-*.safetensors"))


DAMAGE = {  # what a crash, a full disk or a careless hand can leave of the newest checkpoint
    "meta.json missing": lambda ck: (ck / "meta.json").unlink(),
    "meta.json cut short": lambda ck: (ck / "meta.json").write_text((ck / "meta.json").read_text()[:50]),
    "shard truncated": lambda ck: shard_of(ck).write_bytes(shard_of(ck).read_bytes()[:5000]),
    "shard empty": lambda ck: shard_of(ck).write_bytes(b""),
    "rng truncated": lambda ck: (ck / "rng" / "rank0.safetensors").write_bytes(b"\0" * 8),
    "rng missing": lambda ck: (ck / "rng" / "rank0.safetensors").unlink(),
    "a flipped byte": lambda ck: shard_of(ck).write_bytes(
        (lambda b: b[:-10] + bytes([b[-10] ^ 1]) + b[-9:])(shard_of(ck).read_bytes())),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_skips_a_damaged_newest_checkpoint_and_says_why(finished, tmp_path, damage, capsys):
    out = crashed_copy(finished, tmp_path / "run")
    DAMAGE[damage](out / "checkpoints" / "step_000012")
    train(cfg(out, resume=True))
    said = capsys.readouterr()
    assert "skipping a damaged checkpoint: step_000012" in said.err and "resuming at step 8" in said.out
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(finished)]
    assert torch.equal(params(load_gpt2(out / "final")), params(load_gpt2(finished / "final")))
    check_checkpoint(out / "checkpoints" / "step_000012")  # written again, whole


@pytest.mark.parametrize("pointer", ["missing", "empty", "wrong"])
def test_the_latest_pointer_is_not_needed(finished, tmp_path, pointer):
    out = crashed_copy(finished, tmp_path / "run")
    latest = out / "checkpoints" / "latest"
    if pointer == "missing": latest.unlink()
    else: latest.write_text("" if pointer == "empty" else "step_000004")
    assert usable_checkpoint(out) == (out / "checkpoints" / "step_000012", [])
    train(cfg(out, resume=True))  # nothing left to train: the final model is written from step 12
    assert torch.equal(params(load_gpt2(out / "final")), params(load_gpt2(finished / "final")))


def test_with_no_intact_checkpoint_resume_stops_and_touches_nothing(finished, tmp_path):
    out = crashed_copy(finished, tmp_path / "run")
    for ck in checkpoints(out): shard_of(ck).write_bytes(b"")
    before = snapshot(out)
    with pytest.raises(RunError, match="no intact checkpoint.*step_000012/shard.*nothing was changed"):
        train(cfg(out, resume=True))
    assert snapshot(out) == before  # metrics.jsonl not emptied, no checkpoint pruned, no final/ written


def test_metrics_without_a_checkpoint_are_never_restarted_silently(tmp_path):
    out = tmp_path / "run"; out.mkdir()
    (out / "config.json").write_text(json.dumps({"command": "llm_scratch_train"}))
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 10.0}\n')
    before = snapshot(out)
    with pytest.raises(RunError, match="no intact checkpoint.*none was saved"): train(cfg(out, resume=True))
    with pytest.raises(RunError, match="already holds a run"): train(cfg(out))
    assert snapshot(out) == before


def test_resume_in_an_empty_folder_starts_afresh(tmp_path):
    (tmp_path / "run").mkdir()
    train(cfg(tmp_path / "run", resume=True, max_steps=2, save_every=0))
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_pruning_orders_checkpoints_by_step_number_not_by_name(tmp_path):
    for s in (999_998, 999_999, 1_000_000, 1_000_001):
        (tmp_path / "checkpoints" / f"step_{s:06d}").mkdir(parents=True)
    # as strings, "step_1000000" < "step_999998": the old sort deleted the newest checkpoint
    assert [p.name for p in checkpoints(tmp_path)] == ["step_1000001", "step_1000000", "step_999999", "step_999998"]
    (tmp_path / "checkpoints" / ".step_000005.tmp").mkdir()  # a save that was killed
    gone = prune_checkpoints(tmp_path, 1_000_000, keep=2)  # 1,000,001 is past the step: a damaged leftover
    assert sorted(p.name for p in gone) == [".step_000005.tmp", "step_1000001", "step_999998"]
    assert [p.name for p in checkpoints(tmp_path)] == ["step_1000000", "step_999999"]


def test_resume_refuses_data_that_changed(tmp_path):
    text = tmp_path / "story.txt"
    text.write_text(fetch("the-verdict").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "run"
    train(cfg(out, data=str(text), max_steps=4, save_every=2))
    was = json.loads((out / "checkpoints" / "step_000004" / "meta.json").read_text())["data"]["sha256"]
    text.write_text(text.read_text(encoding="utf-8") + "One more line.\n", encoding="utf-8")
    before = snapshot(out)
    with pytest.raises(RunError, match=f"the data changed.*has SHA-256 [0-9a-f]{{64}}, the run trained on {was}"):
        train(cfg(out, data=str(text), max_steps=6, save_every=2, resume=True))
    assert snapshot(out) == before
    train(cfg(out, data=str(text), max_steps=6, save_every=2, resume=True, allow_data_change=True))
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))


def test_resume_may_change_the_layout_but_not_the_global_batch(tmp_path):
    straight = tmp_path / "straight"
    train(cfg(straight, dropout=0.0, max_steps=8))  # no dropout: its masks depend on the batch layout
    out = crashed_copy(straight, tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step_000008")
    with pytest.raises(RunError, match="global batch: 2 -> 4"): train(cfg(out, dropout=0.0, resume=True, batch_size=4))
    train(cfg(out, dropout=0.0, max_steps=8, resume=True, batch_size=1, grad_accum=2))  # the same windows, two micro-steps
    a, b = read_metrics(out), read_metrics(straight)
    assert [r["step"] for r in a] == list(range(1, 9))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-5


# --- loading runs no code from a checkpoint ------------------------------------------------------------

class Payload:
    "Unpickling this object writes a file: proof that a loader ran code from a checkpoint."
    marker = ""

    def __reduce__(self): return (Path.write_text, (Path(self.marker), "pwned"))


def test_a_crafted_checkpoint_cannot_run_code(finished, tmp_path):
    out = crashed_copy(finished, tmp_path / "run")
    marker = tmp_path / "pwned.txt"
    Payload.marker = str(marker)
    ck = out / "checkpoints" / "step_000012"
    evil = pickle.dumps(Payload())
    # the files a pickle-based loader would read: DCP's .metadata and data files, torch.save'd RNG states
    for name in (".metadata", "__0_0.distcp", "rng-rank0.pt", "rng/rank0.pt"): (ck / name).write_bytes(evil)
    torch.save({"x": Payload()}, ck / "evil.pt")
    meta = json.loads((ck / "meta.json").read_text())  # an attacker can list them with the right hashes
    meta["files"] = {k: v for k, v in checkpoint_mod._manifest(ck).items() if k != "meta.json"}
    (ck / "meta.json").write_text(json.dumps(meta))
    check_checkpoint(ck)
    model = load_trained(out)
    train(cfg(out, resume=True, max_steps=13))
    assert not marker.exists()
    assert torch.equal(params(model), params(load_trained(finished)))
    # the old format (a pickled .metadata, no list of files) is refused rather than read
    old = out / "checkpoints" / "step_000020"; old.mkdir()
    (old / ".metadata").write_bytes(evil)
    (old / "meta.json").write_text(json.dumps({"step": 20, "model_config": meta["model_config"]}))
    with pytest.raises(CheckpointDamaged, match="older llm_scratch"): load_trained(old)
    assert not marker.exists()


# --- --out ----------------------------------------------------------------------------------------------

def test_out_must_be_new_empty_or_a_run_of_the_same_command(tmp_path, capsys):
    (tmp_path / "notes").mkdir(); (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "a-file").write_text("keep me too")
    ft = tmp_path / "ft"; ft.mkdir(); (ft / "config.json").write_text(json.dumps({"command": "llm_scratch_finetune classify"}))
    common = ["--model", "tiny", "--max-steps", "1", "--no-progress"]
    for out, msg in ((tmp_path / "notes", "holds other files"), (tmp_path / "a-file", "is a file"),
                     (ft, "not a run of llm_scratch_train")):
        assert main(common + ["--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert main(common + ["--out", str(tmp_path / "a-file" / "run")]) == 2  # a folder that cannot be made
    assert "cannot write the run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: main(common + ["--out", ""])
    assert e.value.code == 2 and "out must name a folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    assert (tmp_path / "a-file").read_text() == "keep me too"
    assert sorted(p.name for p in ft.iterdir()) == ["config.json"]


def test_finetune_out_is_checked_the_same_way(tmp_path, capsys):
    from llm_scratch.finetune import main as finetune
    (tmp_path / "notes").mkdir(); (tmp_path / "notes" / "todo.txt").write_text("keep me")
    (tmp_path / "f").write_text("a file")
    run = tmp_path / "run"; run.mkdir(); (run / "config.json").write_text(json.dumps({"command": "llm_scratch_train"}))
    for out, msg in ((tmp_path / "notes", "holds other files"), (run, "not a run of llm_scratch_finetune classify")):
        assert finetune(["classify", "--init", "scratch:tiny", "--limit", "8", "--out", str(out)]) == 2
        assert msg in capsys.readouterr().err
    assert finetune(["classify", "--init", "scratch:tiny", "--limit", "8", "--out", str(tmp_path / "f" / "x")]) == 2
    assert "cannot write the run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e: finetune(["instruct", "--init", "scratch:tiny", "--out", " "])
    assert e.value.code == 2 and "out must name a folder" in capsys.readouterr().err
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


# --- a loss that stops being a number ---------------------------------------------------------------------

def test_a_diverging_run_stops_at_the_first_bad_loss_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(Diverged, match=r"at step \d+: training diverged\. The last checkpoint, step 2, is kept"):
        train(cfg(out, lr=1e4, warmup=5, grad_clip=0, save_every=2, max_steps=50))
    assert not (out / "final").exists() and not (out / "run.json").exists()
    assert [p.name for p in checkpoints(out)] == ["step_000002"]
    assert all(torch.isfinite(p).all() for p in load_trained(out).parameters())
    for line in (out / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN or Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
    assert main(["--model", "tiny", "--context-length", "32", "--batch-size", "2", "--lr", "1e4", "--warmup", "0",
                 "--grad-clip", "0", "--no-progress", "--out", str(tmp_path / "cli")]) == 2
    assert "training diverged" in capsys.readouterr().err


def test_metrics_lines_are_strict_json():
    line = metrics_mod.json_line({"step": 1, "loss": math.nan, "grad_norm": math.inf, "lr": 1e-3})
    assert json.loads(line, parse_constant=lambda c: pytest.fail(c)) == {"step": 1, "loss": None, "grad_norm": None,
                                                                          "lr": 1e-3}


def test_finetune_stops_on_a_non_finite_loss(tmp_path, capsys):
    from llm_scratch.finetune import main as finetune
    assert finetune(["classify", "--init", "scratch:tiny", "--limit", "16", "--batch-size", "4", "--lr", "1e12",
                     "--train", "all", "--no-progress", "--out", str(tmp_path / "ft")]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not (tmp_path / "ft" / "final").exists()


# --- everything is checked before anything is written -----------------------------------------------------

@pytest.mark.parametrize("argv, msg", [
    (["--seed", "-1"], "seed must be between 0"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--lr", "nan"], "lr must be a finite number, got nan"),
    (["--grad-clip", "nan"], "grad_clip must be a finite number"),
])
def test_train_checks_options_before_writing(tmp_path, capsys, argv, msg):
    with pytest.raises(SystemExit) as e: main(argv + ["--out", str(tmp_path / "run")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, msg", [
    (["instruct", "--max-new-tokens", "-1"], "max_new_tokens must be at least 1"),
    (["instruct", "--generate", "-3"], "generate must be at least 0"),
    (["classify", "--seed", "-1"], "seed must be between 0 and 2**63 - 1"),
    (["classify", "--lr", "inf"], "lr must be a finite number"),
    (["classify", "--grad-clip", "-1"], "grad_clip must not be negative"),
    (["classify", "--lora-alpha", "0"], "lora_alpha must be a positive number"),
])
def test_finetune_checks_options_before_writing(tmp_path, capsys, argv, msg):
    from llm_scratch.finetune import main as finetune
    with pytest.raises(SystemExit) as e: finetune(argv + ["--init", "scratch:tiny", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- files others can read ----------------------------------------------------------------------------------

def test_written_files_follow_the_umask(tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o022)
    try:
        fetch("the-verdict")
        train(cfg(tmp_path / "run", max_steps=2, save_every=2))
    finally: os.umask(old)
    files = [p for p in [*(tmp_path / "cache").rglob("*"), *(tmp_path / "run").rglob("*")] if p.is_file()]
    assert any(p.suffix == ".bin" for p in files) and any(p.name == "model.safetensors" for p in files)
    assert any(p.name.startswith("shard-") for p in files) and any(p.parent.name == "rng" for p in files)
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert {m for m in modes.values()} == {"0o644"}, {f: m for f, m in modes.items() if m != "0o644"}  # mkstemp alone would give 0o600


# --- clear errors, exit 2, no traceback ---------------------------------------------------------------------

def cli(args, env_extra=None, cwd=None):
    "The trainer as a user runs it: a separate process, its exit status and its stderr."
    env = dict(os.environ, **(env_extra or {}))
    p = subprocess.run([sys.executable, "-m", "llm_scratch.train", "--model", "tiny", "--context-length", "32",
                        "--batch-size", "2", "--max-steps", "2", "--no-progress", *args],
                       env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    return p.returncode, p.stderr


def assert_clear(rc_err, *needles):
    rc, err = rc_err
    assert rc == 2, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for n in needles: assert n in err, err[-3000:]


def test_bad_data_files_get_clear_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1") * 10)
    (tmp_path / "wide.txt").write_text("".join(map(chr, range(0x10000, 0x10000 + 70_000))),
                                       encoding="utf-8")
    out = str(tmp_path / "run")
    assert_clear(cli(["--data", str(tmp_path / "empty.txt"), "--out", out]), "is an empty file")
    assert_clear(cli(["--data", str(tmp_path / "latin1.txt"), "--out", out]), "is not UTF-8 text", "iconv")
    assert_clear(cli(["--data", "gpt2-vocab", "--out", out]), "gpt2-vocab is a set of files", "the-verdict")
    assert_clear(cli(["--data", str(tmp_path), "--out", out]), "is a folder")
    assert_clear(cli(["--data", str(tmp_path / "wide.txt"), "--tokenizer", "char", "--out", out]),
                 "70,000 distinct characters", "--tokenizer gpt2")
    assert not (tmp_path / "run").exists()


def test_cache_and_mirror_problems_get_clear_errors(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "run")
    assert_clear(cli(["--out", out], {"LLM_SCRATCH_CACHE": str(tmp_path / "file" / "cache")}),
                 "cannot write", "LLM_SCRATCH_CACHE")
    assert_clear(cli(["--out", out], {"LLM_SCRATCH_CACHE": str(tmp_path / "c2"),
                                      "LLM_SCRATCH_DATA": str(tmp_path / "no-such-mirror")}),
                 "LLM_SCRATCH_DATA=", "is not a folder")
    (tmp_path / "bad.toml").write_text("max-steps = = 3\n")
    assert_clear(cli(["--config", str(tmp_path / "bad.toml"), "--out", out]), f"{tmp_path / 'bad.toml'} is not valid TOML")
    assert not (tmp_path / "run").exists()


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real, calls = checkpoint_mod.save_file, []

    def full_disk(*a, **kw):  # the second checkpoint's RNG file hits a full disk
        calls.append(1)
        if len(calls) == 2: raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **kw)
    monkeypatch.setattr(checkpoint_mod, "save_file", full_disk)
    with pytest.raises(RunError, match=rf"could not write the checkpoint step_000004 in {out / 'checkpoints'} "
                                       r"\(\[Errno 28\] No space left on device\)"):
        train(cfg(out, max_steps=6, save_every=2))
    assert (out / "checkpoints" / "latest").read_text() == "step_000002"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["latest", "step_000002"]  # no temporary folder left
    check_checkpoint(out / "checkpoints" / "step_000002")
    monkeypatch.setattr(checkpoint_mod, "save_file", real)
    train(cfg(out, max_steps=6, save_every=2, resume=True))  # once there is space again
    assert [r["step"] for r in read_metrics(out)] == list(range(1, 7))


# --- load_gpt2 ---------------------------------------------------------------------------------------------

@pytest.fixture
def small_gpt2(tmp_path):
    from llm_scratch.model import GPTConfig, GPTModel
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=2, n_layers=2))
    return model, save_gpt2(model, tmp_path / "gpt")


@pytest.mark.parametrize("config, msg", [
    ("[1, 2]", "must hold a JSON object"),
    ('{"n_embd": 32, "n_head": 2}', "lacks vocab_size, n_positions, n_layer"),
    ('{"n_embd": 32', "not readable JSON"),
])
def test_load_gpt2_refuses_a_broken_config(small_gpt2, config, msg):
    _, folder = small_gpt2
    (folder / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=f"config.json: .*{msg}"): load_gpt2(folder)


def test_load_gpt2_refuses_a_truncated_file(small_gpt2):
    _, folder = small_gpt2
    f = folder / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"): load_gpt2(folder)


def test_load_gpt2_does_not_guess_the_number_of_heads(small_gpt2):
    model, folder = small_gpt2
    (folder / "config.json").unlink()
    # the shapes of a 2-head model are those of a 4-head one: guessing loaded it with wrong logits
    with pytest.raises(CheckpointError, match="No config.json beside .* pass preset="): load_gpt2(folder)


def test_finetune_init_from_a_broken_folder_is_a_clear_error(small_gpt2, capsys):
    from llm_scratch.finetune import main as finetune
    _, folder = small_gpt2
    (folder / "config.json").write_text("[]")
    assert finetune(["classify", "--init", str(folder), "--out", str(folder.parent / "ft")]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err
