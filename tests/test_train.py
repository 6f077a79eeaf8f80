"""The trainer in several processes (CPU, gloo): DDP through `accelerate launch`, FSDP2 through `torchrun`,
gradient accumulation, exact resume after `kill -9`, and the command line's errors."""
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from llm_scratch.metrics import read_metrics
from llm_scratch.checkpoint import load_trained
from llm_scratch.weights import load_gpt2

from conftest import kill_tree, launch_command, rewound_copy

# the tiny preset with a short context: about 0.1-0.3 s a step on two shared cores
BASE = ["--model", "tiny", "--data", "the-verdict", "--context-length", "64", "--lr", "1e-3", "--warmup", "5",
        "--log-every", "1", "--eval-every", "10", "--eval-batches", "2", "--no-progress",
        "--precision", "fp32"]  # float32: process layouts are compared to 1e-4 (bf16 autocast agrees to ~2e-4)


def command(args, nproc=1, launcher="accelerate"):
    "The command line that runs the trainer with `args` in `nproc` processes."
    return launch_command("llm_scratch.train", args, nproc, launcher)


def run(env, args, nproc=1, launcher="accelerate", check=True, timeout=300):
    p = subprocess.run(command(args, nproc, launcher), env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(out): return {r["step"]: r["loss"] for r in read_metrics(out)}


def params(model): return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.fixture(scope="module")
def ddp_run(env, tmp_path_factory):
    "30 steps of DDP on 2 processes, with dropout, a checkpoint every 10 steps: the reference of the resume test."
    out = tmp_path_factory.mktemp("ddp") / "run"
    t = time.perf_counter()
    run(env, BASE + ["--max-steps", "30", "--batch-size", "2", "--save-every", "10", "--out", str(out)], nproc=2)
    print(f"ddp run: {time.perf_counter() - t:.1f} s")
    return out


def test_ddp_two_processes_learn_and_stay_identical(ddp_run):
    summary = json.loads((ddp_run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp"
    loss = losses(ddp_run)
    assert sorted(loss) == list(range(1, 31))
    assert sum(loss[s] for s in range(26, 31)) / 5 < sum(loss[s] for s in range(1, 6)) / 5 - 0.5  # it learns
    ranks = summary["ranks"]
    assert len(ranks) == 2 and ranks[0]["fingerprint"] == ranks[1]["fingerprint"]  # identical parameters
    assert ranks[0]["parameters"] == ranks[1]["parameters"] == summary["parameters"]  # each holds all of them
    ckpts = sorted(p.name for p in (ddp_run / "checkpoints").glob("step_*"))
    assert ckpts == ["step_000020", "step_000030"]  # --keep 2
    assert (ddp_run / "checkpoints" / "latest").read_text() == "step_000030"
    rows = read_metrics(ddp_run)
    assert {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0]) and "val_loss" in rows[9]
    assert (ddp_run / "loss.png").stat().st_size > 5000
    final, ck = load_gpt2(ddp_run / "final"), load_trained(ddp_run)
    assert torch.equal(params(final), params(ck))


def test_sigkill_and_resume_give_the_same_losses_step_for_step(env, ddp_run, tmp_path):
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "30", "--batch-size", "2", "--save-every", "10", "--out", str(out)]
    p = subprocess.Popen(command(args, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # its own process group: the launcher and both workers
    latest, deadline = out / "checkpoints" / "latest", time.time() + 240

    def logged():  # steps in metrics.jsonl so far
        try: return len((out / "metrics.jsonl").read_text().splitlines())
        except FileNotFoundError: return 0
    # kill a few steps after the first checkpoint, so that the resume must also drop metric lines past it
    while not (latest.is_file() and logged() >= 13) and p.poll() is None and time.time() < deadline: time.sleep(0.02)
    kill_tree(p)
    p.wait()
    assert latest.is_file(), p.stderr.read()[-3000:]
    assert not (out / "run.json").exists(), "the run finished before it could be killed"
    killed_at = max(losses(out))
    print(f"killed after step {killed_at}, checkpoint {latest.read_text()}")
    assert killed_at > int(latest.read_text()[5:])  # lines past the checkpoint, to be written again
    run(env, args + ["--resume"], nproc=2)
    resumed, straight = read_metrics(out), read_metrics(ddp_run)
    assert [r["step"] for r in resumed] == list(range(1, 31))
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]  # exact, dropout included
    assert [r.get("val_loss") for r in resumed] == [r.get("val_loss") for r in straight]
    assert torch.equal(params(load_gpt2(out / "final")), params(load_gpt2(ddp_run / "final")))


@pytest.mark.parametrize("layout", [["--zero", "2"], ["--strategy", "pp"]], ids=["zero2", "pipeline"])
def test_sigkill_and_resume_under_zero_and_a_pipeline(env, tmp_path, layout):
    "`kill -9` of a ZeRO-2 run and of a 2-stage pipeline (dropout on), then --resume: the uninterrupted run's losses."
    args = BASE + layout + ["--max-steps", "12", "--batch-size", "2", "--save-every", "4"]
    run(env, args + ["--out", str(tmp_path / "straight")], nproc=2)
    out = tmp_path / "run"
    p = subprocess.Popen(command(args + ["--out", str(out)], 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 240
    logged = lambda: len(read_metrics(out)) if (out / "metrics.jsonl").is_file() else 0
    while not (latest.is_file() and logged() >= 6) and p.poll() is None and time.time() < deadline: time.sleep(0.01)
    kill_tree(p)
    p.wait()
    assert latest.is_file() and not (out / "run.json").exists(), "the run finished before it could be killed"
    print(f"killed after step {max(losses(out))}, checkpoint {latest.read_text()}")
    run(env, args + ["--out", str(out), "--resume"], nproc=2)
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert torch.equal(params(load_gpt2(out / "final")), params(load_gpt2(tmp_path / "straight" / "final")))


def test_kill_at_random_moments_and_resume_give_the_uninterrupted_run(env, ddp_run, tmp_path):
    "Fault injection: `kill -9` of both processes while training and while writing checkpoints, then resume."
    out = tmp_path / "run"
    args = BASE + ["--max-steps", "30", "--batch-size", "2", "--save-every", "3", "--out", str(out)]
    rng, kills, restarts = random.Random(2026), [], 0
    plan = ["saving", "random"] * 3 + ["none"] * 4  # six kills, then runs to the end

    def logged(): return len(read_metrics(out)) if (out / "metrics.jsonl").is_file() else 0
    def attempt(mode):  # one launch, killed as `mode` says; False if it must be started again from nothing
        argv = args + (["--resume"] if out.exists() else [])
        p = subprocess.Popen(command(argv, 2), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
        deadline, before, started, delay = time.time() + 240, logged(), None, rng.uniform(0, 1.5)
        while p.poll() is None and time.time() < deadline:
            if started is None and logged() != before: started = time.time()  # past start-up, training
            # a checkpoint being written right now, while an older one is whole
            saving = any((out / "checkpoints").glob(".step_*.tmp")) and any((out / "checkpoints").glob("step_*"))
            if (mode == "saving" and saving) or (mode == "random" and started and time.time() - started > delay):
                kill_tree(p); kills.append((mode, logged()))
                break
            time.sleep(0.005)
        p.wait()
        err = p.stderr.read()
        if p.returncode != 0 and "no intact checkpoint" in err:  # killed before the first checkpoint was whole
            assert "nothing was changed" in err
            shutil.rmtree(out)  # starting afresh is the user's call, not the trainer's
            return False
        if p.returncode not in (0, -signal.SIGKILL): raise AssertionError(err[-3000:])
        return True
    for mode in plan:
        while not attempt(mode): restarts += 1
        if (out / "run.json").exists(): break
    print(f"kills (mode, steps logged): {kills}; restarts from nothing: {restarts}")
    assert [m for m, _ in kills] == plan[:6]  # every planned kill happened before the run could finish
    assert [r["loss"] for r in read_metrics(out)] == [r["loss"] for r in read_metrics(ddp_run)]
    assert torch.equal(params(load_gpt2(out / "final")), params(load_gpt2(ddp_run / "final")))


def test_fsdp_shards_and_matches_one_process(env, tmp_path):
    common = BASE + ["--max-steps", "10", "--dropout", "0", "--save-every", "5"]
    run(env, common + ["--batch-size", "2", "--strategy", "fsdp", "--out", str(tmp_path / "fsdp")], 2, "torchrun")
    run(env, common + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    summary = json.loads((tmp_path / "fsdp" / "run.json").read_text())
    n = summary["parameters"]
    for r in summary["ranks"]:  # each rank holds about half of the parameters, gradients and Adam moments
        assert abs(r["parameters"] / n - 0.5) < 0.01
        assert r["gradients"] == r["parameters"] and r["optimizer_state"] == 2 * r["parameters"]
    assert sum(r["parameters"] for r in summary["ranks"]) == n
    assert len(list((tmp_path / "fsdp" / "checkpoints" / "step_000010").glob("shard-*.safetensors"))) == 2  # a file a rank
    # the same init and the same global batches: the gathered model equals the one-process model
    a, b = losses(tmp_path / "fsdp"), losses(tmp_path / "one")
    fsdp, one = params(load_gpt2(tmp_path / "fsdp" / "final")), params(load_gpt2(tmp_path / "one" / "final"))
    print(f"fsdp vs one process: loss {max(abs(a[s] - b[s]) for s in a):.1e}, params {(fsdp - one).abs().max():.1e}")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert (fsdp - one).abs().max() < 1e-4
    # the sharded training checkpoint loads into one process, without a process group
    assert torch.equal(params(load_trained(tmp_path / "fsdp")), fsdp)
    # and resumes there: the step-5 checkpoint of 2 FSDP processes, on 1 process with 2 micro-steps of the same
    # windows (the same global batch); model and Adam state are resharded from the safetensors shards
    res = rewound_copy(tmp_path / "fsdp", tmp_path / "resharded", 5)
    run(env, common + ["--batch-size", "2", "--grad-accum", "2", "--strategy", "fsdp", "--out", str(res), "--resume"])
    c = losses(res)
    assert sorted(c) == list(range(1, 11)) and max(abs(a[s] - c[s]) for s in range(6, 11)) < 1e-4
    assert (params(load_gpt2(res / "final")) - fsdp).abs().max() < 1e-4


def test_zero_1_and_2_match_one_process_hold_their_slice_and_resume_exactly(env, tmp_path):
    common = BASE + ["--max-steps", "6", "--dropout", "0", "--save-every", "3"]
    run(env, common + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    one = params(load_gpt2(tmp_path / "one" / "final"))
    for stage in (1, 2):
        out = tmp_path / f"zero{stage}"
        run(env, common + ["--batch-size", "2", "--zero", str(stage), "--out", str(out)], nproc=2)
        a, b = losses(out), losses(tmp_path / "one")
        z = params(load_gpt2(out / "final"))
        print(f"ZeRO-{stage} vs one process: loss {max(abs(a[s] - b[s]) for s in a):.1e}, params {(z - one).abs().max():.1e}")
        assert sorted(a) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 1e-5
        assert (z - one).abs().max() < 1e-5
        summary = json.loads((out / "run.json").read_text())
        n, ranks = summary["parameters"], summary["ranks"]
        assert summary["zero"] == stage and len({r["fingerprint"] for r in ranks}) == 1  # the replicas agree
        for r in ranks:  # whole parameters; AdamW's two moments for half of them; under stage 2 half the gradients
            assert (r["parameters"], r["gradients"], r["optimizer_state"]) == (n, n // stage, n), r
        assert torch.equal(params(load_trained(out)), z)  # the checkpoint's model is an ordinary one
    # resume from step 3: in the same layout, and ZeRO-2's checkpoint of 2 processes in 1 process (ZeRO-1, 2 micro-steps)
    for name, extra, nproc in [("same", ["--batch-size", "2", "--zero", "2"], 2),
                               ("one", ["--batch-size", "2", "--grad-accum", "2", "--zero", "1"], 1)]:
        res = rewound_copy(tmp_path / "zero2", tmp_path / f"resumed-{name}", 3)
        run(env, common + extra + ["--out", str(res), "--resume"], nproc=nproc)
        a, b = losses(res), losses(tmp_path / "zero2")
        d = (params(load_gpt2(res / "final")) - params(load_gpt2(tmp_path / "zero2" / "final"))).abs().max()
        if name == "same": assert a == b and d == 0  # bit for bit
        else: assert sorted(a) == sorted(b) and max(abs(a[s] - b[s]) for s in a) < 1e-6 and d < 1e-6, (a, b, d)  # sums in another order
    p = run(env, common + ["--batch-size", "2", "--out", str(tmp_path / "zero2"), "--resume"], check=False)
    assert p.returncode == 2 and "zero: 2 -> 0" in p.stderr  # a per-parameter optimiser cannot read the slices


def test_grad_accum_on_two_processes_equals_a_four_times_batch(env, tmp_path):
    common = BASE + ["--max-steps", "3", "--dropout", "0", "--grad-clip", "0"]
    run(env, common + ["--batch-size", "1", "--grad-accum", "2", "--out", str(tmp_path / "acc")], nproc=2)
    run(env, common + ["--batch-size", "4", "--out", str(tmp_path / "big")])
    a, b = losses(tmp_path / "acc"), losses(tmp_path / "big")
    d = (params(load_gpt2(tmp_path / "acc" / "final")) - params(load_gpt2(tmp_path / "big" / "final"))).abs().max()
    print(f"2 x accum 2 vs 4x batch: loss {max(abs(a[s] - b[s]) for s in a):.1e}, params {d:.1e}")
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5  # float32 sums in another order
    assert d < 1e-5, d


def test_command_line_errors_are_clear(env, tmp_path):
    p = run(env, ["--help"])
    for opt in ("--model", "--data", "--tokenizer", "--context-length", "--batch-size", "--grad-accum", "--lr",
                "--warmup", "--max-steps", "--eval-every", "--save-every", "--log-every", "--out", "--resume",
                "--precision", "--strategy", "--zero", "--seed", "--compile", "--config", "MALLOC_MMAP_MAX_"):
        assert opt in p.stdout, opt
    p = run(env, ["--batch-size", "0"], check=False)
    assert p.returncode == 2 and "batch_size must be at least 1" in p.stderr
    p = run(env, ["--precision", "fp16"], check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = run(env, ["--zero", "1", "--strategy", "tp"], check=False)
    assert p.returncode == 2 and "--zero 1 does not go with --strategy tp" in p.stderr
    p = run(env, ["--data", "the-verdict", "--context-length", "512", "--batch-size", "64",
                  "--out", str(tmp_path / "small")], check=False)
    assert p.returncode == 2 and "corpus is too small" in p.stderr and "Traceback" not in p.stderr
    (tmp_path / "c.toml").write_text("max-steps = 2\nbatch-size = 2\ncontext-length = 32\ntokenizer = 'char'\n"
                                     f"out = '{tmp_path / 'toml'}'\nprogress = false\nnot-an-option = 1\n")
    p = run(env, ["--config", str(tmp_path / "c.toml")], check=False)
    assert p.returncode == 2 and "unknown option(s) not_an_option" in p.stderr
    (tmp_path / "c.toml").write_text((tmp_path / "c.toml").read_text().replace("not-an-option = 1\n", ""))
    run(env, ["--config", str(tmp_path / "c.toml"), "--save-every", "1"])  # a char-level run from a TOML file
    assert [r["step"] for r in read_metrics(tmp_path / "toml")] == [2]
    p = run(env, ["--config", str(tmp_path / "c.toml")], check=False)
    assert p.returncode == 2 and "already holds a run" in p.stderr


def test_a_bad_data_file_stops_every_process_with_one_message(env, tmp_path):
    "Process 0 reads --data first; when it fails, process 1 must stop too, not crash waiting for it."
    (tmp_path / "empty.txt").write_bytes(b"")
    p = run(env, ["--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "run")], nproc=2, check=False)
    assert p.returncode != 0
    assert p.stderr.count("llm_scratch_train: error:") == 1 and "is an empty file" in p.stderr
    assert "[rank1]" not in p.stderr and "[rank0]" not in p.stderr, p.stderr[-3000:]  # no worker tracebacks
    assert not (tmp_path / "run").exists()


def test_the_8_gpu_config_parses():
    from llm_scratch.train import parse_args
    repo = Path(__file__).resolve().parents[1]
    cfg = parse_args(["--config", str(repo / "configs" / "gpt2-124m-8gpu.toml"), "--max-steps", "10"])
    assert (cfg.model, cfg.context_length, cfg.precision, cfg.compile, cfg.max_steps) == ("gpt2-small", 1024, "bf16",
                                                                                          "on", 10)
    assert cfg.batch_size * cfg.grad_accum * 8 * cfg.context_length == 491_520  # nanoGPT's tokens per step


@pytest.mark.parametrize("env_value", [None, "65536"])
def test_the_commands_tune_the_allocator_unless_the_environment_chose(monkeypatch, tmp_path, capsys, env_value):
    import llm_scratch.finetune as finetune
    import llm_scratch.train as train
    calls = []
    monkeypatch.setattr(train, "tune_malloc", lambda: calls.append("train") or True)
    monkeypatch.setattr(finetune, "tune_malloc", lambda: calls.append("finetune") or True)
    if env_value is None: monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    else: monkeypatch.setenv("MALLOC_MMAP_MAX_", env_value)
    # both runs stop at a clear error (exit 2) after the allocator step, before any training
    assert train.main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "run")]) == 2
    assert finetune.main(["classify", "--init", "gtp2-small", "--out", str(tmp_path / "ft")]) == 2
    assert "error" in capsys.readouterr().err
    assert calls == ([] if env_value else ["train", "finetune"])
