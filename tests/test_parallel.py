"""Parallelism on two CPU processes (gloo), each strategy against one process: the memory each rank holds against
ZeRO's arithmetic, tensor parallelism (forward, gradients, an AdamW step), the GPipe pipeline, and the trainer's
`--strategy tp` against a one-process run, including an exact resume."""
import json
import os
import subprocess
import time

import pytest
import torch

from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.parallel import (bubble_fraction, gpipe_timeline, launch, tp_sharded_params, zero_memory,
                                  zero_parts)
from llm_scratch.model import count_params
from llm_scratch.metrics import read_metrics
from llm_scratch.distributed import bytes_per_rank
from llm_scratch.checkpoint import load_trained

from conftest import launch_command, rewound_copy
from llm_scratch.weights import load_gpt2


@pytest.fixture(scope="module", autouse=True)
def fast_malloc():
    "The workers inherit the environment: the fast malloc settings, no stray thread count."
    old = {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    os.environ.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="100000000000")
    yield
    for k, v in old.items():
        if v is None: os.environ.pop(k, None)
        else: os.environ[k] = v


def test_zero_memory_reproduces_the_paper_and_generalises_bytes_per_rank():
    gb = [zero_memory(7.5e9, 64, s) / 1e9 for s in range(4)]
    assert [round(g, 1) for g in gb] == [120.0, 31.4, 16.6, 1.9]
    for n, w in [(124_439_808, 8), (1_557_611_200, 64), (7, 3)]:
        assert zero_parts(n, w, 0, 8, 4, 4) == pytest.approx(bytes_per_rank(n, w, "ddp"), rel=1e-12)
        assert zero_parts(n, w, 3, 8, 4, 4) == pytest.approx(bytes_per_rank(n, w, "fsdp"), rel=1e-12)
    assert zero_memory(1e9, 1, 3) == zero_memory(1e9, 1, 0) == 16e9  # one device: nothing to shard
    with pytest.raises(ValueError, match="stage must be 0, 1, 2 or 3"): zero_memory(1e9, 8, 5)
    for p in (2, 4):
        for m in (1, 3, 8): assert abs(bubble_fraction(gpipe_timeline(p, m)) - (p - 1) / (m + p - 1)) < 1e-12


def test_held_bytes_match_the_prediction():
    t = time.perf_counter()
    ranks = launch("memory")
    print(f"memory check: {time.perf_counter() - t:.1f} s")
    n, w, s = ranks[0]["n_params"], ranks[0]["world"], ranks[0]["tp_sharded"]
    assert w == 2 and s == tp_sharded_params(GPTConfig.from_preset("tiny", vocab_size=512, context_length=32))
    tp = n - s + s / w
    want = {"ddp": zero_parts(n, w, 0, 8, 4, 4), "zero1": zero_parts(n, w, 1, 8, 4, 4),
            "zero2": zero_parts(n, w, 2, 8, 4, 4), "fsdp": zero_parts(n, w, 3, 8, 4, 4),
            "tp": {"parameters": 4 * tp, "gradients": 4 * tp, "optimizer": 8 * tp}}
    groups = ranks[0]["zero_groups"]
    assert sum(groups) == n and len(groups) == 2  # ZeRO's flat vectors: matrices (decayed) and vectors
    pad = sum(-(-g // w) for g in groups) - n / w  # each slice rounded up to a whole element
    want["zero1"]["optimizer"] += 8 * pad; want["zero2"]["optimizer"] += 8 * pad; want["zero2"]["gradients"] += 4 * pad
    for r in ranks:
        for strategy, pred in want.items():
            held = r[strategy]
            assert (held["parameters"], held["gradients"], held["optimizer_state"]) == \
                   (pred["parameters"], pred["gradients"], pred["optimizer"]), (strategy, held, pred)


def test_tensor_parallel_equals_one_process():
    ranks = launch("tp", lr=1e-3)
    for r in ranks:
        print(r)
        assert r["heads"] == 2 and r["qkv_rows_match"] and r["qkv_local"] == [96, 64] and r["fc_local"] == [128, 64]
        assert r["logits"] < 1e-5 and r["grads"] < 1e-6 and r["step"] < 1e-5, r
    assert ranks[0]["held"] == ranks[1]["held"] < count_params(GPTConfig.from_preset("tiny", vocab_size=512,
                                                                                       context_length=32))


def test_pipeline_equals_one_process_and_has_a_bubble():
    ranks = launch("pp", micro_batches=[1, 4], repeats=1, batch=16)
    last = ranks[-1]
    for m in (1, 4):
        assert last[f"logits_{m}"] < 1e-5 and last[f"loss_{m}"] < 1e-5, last
        assert max(r[f"grads_{m}"] for r in ranks) < 1e-6
    events = [tuple(e) for r in ranks for e in r["runs"]["1"][0]]
    assert sorted((e[0], e[1]) for e in events) == [(0, "B"), (0, "F"), (1, "B"), (1, "F")]
    assert 0.35 < bubble_fraction(events) < 0.8  # one micro-batch: each stage idles while the other works


def test_launch_reports_the_failing_rank():
    with pytest.raises(RuntimeError, match="unexpected keyword argument"): launch("collectives", bogus=1)
    with pytest.raises(ValueError, match="the checks are"): launch("no-such-check")


# the trainer, as tests/test_train.py runs it
BASE = ["--model", "tiny", "--data", "the-verdict", "--context-length", "64", "--lr", "1e-3", "--warmup", "2",
        "--log-every", "1", "--eval-every", "3", "--eval-batches", "2", "--no-progress", "--dropout", "0",
        "--batch-size", "4", "--max-steps", "6", "--save-every", "3", "--precision", "fp32"]


def train(env, args, nproc=1, launcher="torchrun"):
    p = subprocess.run(launch_command("llm_scratch.train", args, nproc, launcher), env=env, capture_output=True, text=True,
                       timeout=300)
    if p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")


def losses(out): return {r["step"]: r["loss"] for r in read_metrics(out)}


def params(model): return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_trainer_tp_matches_one_process_and_resumes_exactly(env, tmp_path):
    t = time.perf_counter()
    train(env, BASE + ["--strategy", "tp", "--out", str(tmp_path / "tp")], nproc=2)
    t_tp = time.perf_counter() - t
    train(env, BASE + ["--out", str(tmp_path / "one")])
    a, b = losses(tmp_path / "tp"), losses(tmp_path / "one")
    tp, one = params(load_gpt2(tmp_path / "tp" / "final")), params(load_gpt2(tmp_path / "one" / "final"))
    print(f"tp run {t_tp:.1f} s; tp vs one process: loss {max(abs(a[s] - b[s]) for s in a):.1e}, "
          f"params {(tp - one).abs().max():.1e}")
    assert sorted(a) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 1e-4
    assert (tp - one).abs().max() < 1e-4
    val_a = [r["val_loss"] for r in read_metrics(tmp_path / "tp") if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(tmp_path / "one") if "val_loss" in r]
    assert len(val_a) == 2 and max(abs(x - y) for x, y in zip(val_a, val_b)) < 1e-4
    summary = json.loads((tmp_path / "tp" / "run.json").read_text())
    n = summary["parameters"]
    split = tp_sharded_params(GPTConfig.from_preset("tiny", context_length=64))
    assert summary["strategy"] == "tp" and [r["parameters"] for r in summary["ranks"]] == [n - split // 2] * 2
    assert torch.equal(params(load_trained(tmp_path / "tp")), tp)  # the checkpoint is an ordinary, whole one
    # resume from the step-3 checkpoint in the same layout: steps 4 to 6 come out identical
    res = rewound_copy(tmp_path / "tp", tmp_path / "resumed", 3)
    train(env, BASE + ["--strategy", "tp", "--out", str(res), "--resume"], nproc=2)
    assert losses(res) == a
    assert torch.equal(params(load_gpt2(res / "final")), tp)


def test_trainer_pp_matches_one_process_and_resumes_exactly(env, tmp_path):
    "The trainer's pipeline (1F1B, and GPipe with gradient accumulation) against one process; resumes; errors."
    train(env, BASE + ["--out", str(tmp_path / "one")])
    train(env, BASE + ["--strategy", "pp", "--out", str(tmp_path / "pp")], nproc=2)  # 2 stages, 2 micro-batches of 2
    train(env, BASE + ["--strategy", "pp", "--pp-schedule", "gpipe", "--batch-size", "2", "--grad-accum", "2",
                       "--micro-batches", "2", "--out", str(tmp_path / "gpipe")], nproc=2)
    b, one = losses(tmp_path / "one"), params(load_gpt2(tmp_path / "one" / "final"))
    for name in ("pp", "gpipe"):
        a, pp = losses(tmp_path / name), params(load_gpt2(tmp_path / name / "final"))
        print(f"{name} vs one process: loss {max(abs(a[s] - b[s]) for s in a):.1e}, params {(pp - one).abs().max():.1e}")
        assert sorted(a) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 1e-5
        assert (pp - one).abs().max() < 1e-5
    val = lambda name: [r["val_loss"] for r in read_metrics(tmp_path / name) if "val_loss" in r]
    assert len(val("pp")) == 2 and max(abs(x - y) for x, y in zip(val("pp"), val("one"))) < 1e-5  # the same windows
    summary = json.loads((tmp_path / "pp" / "run.json").read_text())
    cfg = GPTConfig.from_preset("tiny", context_length=64)
    n, ranks = summary["parameters"], summary["ranks"]
    tied = cfg.vocab_size * cfg.emb_dim  # the first and the last stage each hold the tied embedding / head matrix
    assert n == count_params(cfg) and sum(r["parameters"] for r in ranks) == n + tied
    for r in ranks: assert r["gradients"] == r["parameters"] and r["optimizer_state"] == 2 * r["parameters"]
    assert torch.equal(params(load_trained(tmp_path / "pp")), params(load_gpt2(tmp_path / "pp" / "final")))
    # resume from step 3: as a pipeline (bit for bit), and in one process (the checkpoint holds the model's own names)
    for name, extra, nproc in [("same", ["--strategy", "pp"], 2), ("one", [], 1)]:
        res = rewound_copy(tmp_path / "pp", tmp_path / f"resumed-{name}", 3)
        train(env, BASE + extra + ["--out", str(res), "--resume"], nproc=nproc)
        a, c = losses(res), losses(tmp_path / "pp")
        d = (params(load_gpt2(res / "final")) - params(load_gpt2(tmp_path / "pp" / "final"))).abs().max()
        if name == "same": assert a == c and d == 0, (a, c, d)
        else: assert max(abs(a[s] - c[s]) for s in a) < 1e-5 and d < 1e-5, (a, c, d)
    # what cannot work says so
    for extra, nproc, msg in [(["--n-layers", "1"], 2, "use at most 1 stages"),
                              (["--micro-batches", "3"], 1, "does not split into 3 micro-batches"),
                              (["--micro-batches", "1"], 2, "1F1B needs at least one micro-batch per stage")]:
        p = subprocess.run(launch_command("llm_scratch.train", BASE + ["--strategy", "pp", "--out", str(tmp_path / "x")] + extra,
                                          nproc, launcher="torchrun"), env=env, capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and msg in p.stderr, p.stderr[-2000:]


def test_two_by_two_meshes_match_one_process_and_resume_exactly(env, tmp_path):
    "4 processes as 2 data-parallel groups of 2: tensor parallel inside a group, and 2-stage pipelines; then a resume."
    train(env, BASE + ["--out", str(tmp_path / "one")])
    b, one = losses(tmp_path / "one"), params(load_gpt2(tmp_path / "one" / "final"))
    for name, extra in [("tp", ["--strategy", "tp", "--tp-size", "2"]), ("pp", ["--strategy", "pp", "--pp-size", "2"])]:
        out = tmp_path / name
        train(env, BASE + extra + ["--batch-size", "2", "--out", str(out)], nproc=4,  # global batch 2 x 2 = 4
              launcher="accelerate" if name == "pp" else "torchrun")  # both launchers
        a, m = losses(out), params(load_gpt2(out / "final"))
        print(f"2 x 2 {name} vs one process: loss {max(abs(a[s] - b[s]) for s in a):.1e}, params {(m - one).abs().max():.1e}")
        assert sorted(a) == list(range(1, 7)) and max(abs(a[s] - b[s]) for s in a) < 1e-5 and (m - one).abs().max() < 1e-5
        ranks = json.loads((out / "run.json").read_text())["ranks"]
        held = [r["parameters"] for r in ranks]
        assert held[0] == held[2] and held[1] == held[3] and sum(held) > 2 * len(one)  # the replicas of each piece
        assert sum(held) < 4 * len(one)  # each process holds a piece, not the whole model
    res = rewound_copy(tmp_path / "pp", tmp_path / "resumed", 3)
    train(env, BASE + ["--strategy", "pp", "--pp-size", "2", "--batch-size", "2", "--out", str(res), "--resume"], nproc=4)
    assert losses(res) == losses(tmp_path / "pp")
    assert torch.equal(params(load_gpt2(res / "final")), params(load_gpt2(tmp_path / "pp" / "final")))
    p = subprocess.run(launch_command("llm_scratch.train", BASE + ["--strategy", "tp", "--tp-size", "3", "--out",
                                      str(tmp_path / "x")], 4, launcher="torchrun"), env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode != 0 and "4 processes do not make whole tensor-parallel groups of 3" in p.stderr
