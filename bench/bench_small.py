"""A reader's first model, timed whole: nanoGPT's CPU recipe through `llm_scratch_train`.

    .venv/bin/python bench/bench_small.py                 # the two runs and the profiles, ~3 minutes
    .venv/bin/python bench/bench_small.py --steps 200     # a quick look (figures not comparable)

The recipe is the one nanoGPT's README gives for a CPU: Tiny Shakespeare by character, 4 layers x 128,
4 heads, context 64, batch 12, 2,000 steps at learning rate 1e-3 (cosine to 1e-4 after 100 warmup steps),
no dropout, a validation of 20 batches every 250 steps. Each run is the command itself, in a fresh
process: start-up, data, evaluations and the final checkpoint all count.

- baseline: `--precision fp32 --compile off`, the plain eager float32 path;
- default:  the command with no speed options at all, as a reader runs it (`--precision auto --compile auto`);
- compiled: `--compile on`, first with an empty compile cache (a reader's first run), then with the cache
  that run left (every later run on the machine).

It prints each wall time, its ratio to the baseline, the final validation loss, and the whole-run MFU: the
model FLOPs of the run (training and validation) over the wall time, against the bf16 matrix-product
peak measured in this process (`perf.matmul_flops`). Then, for each path, where the milliseconds of
one step go (`--profile`, on by default): the phases of `train.train_step` timed one by one.
Quote medians; check `uptime` before and after: nothing else may share the cores.
Writes bench/results/small.json (atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "data").is_dir(): os.environ.setdefault("LLM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))

import torch  # noqa: E402

from llm_scratch import perf  # noqa: E402
from llm_scratch.data import write_atomic  # noqa: E402
from llm_scratch.metrics import flops_per_token, read_metrics  # noqa: E402
from llm_scratch.model import GPTConfig  # noqa: E402

RECIPE = dict(data="tinyshakespeare", tokenizer="char", n_layers=4, n_heads=4, emb_dim=128, context_length=64,
              batch_size=12, max_steps=2000, lr=1e-3, min_lr=1e-4, warmup=100, dropout=0.0, eval_every=250,
              eval_batches=20, save_every=0, log_every=50)
PATHS = {"baseline": ["--precision", "fp32", "--compile", "off"], "default": [],
         "compiled, cold cache": ["--compile", "on"], "compiled, warm cache": ["--compile", "on"]}
PROFILED = ("baseline", "default", "compiled, warm cache")


def command(steps: int, out: Path, extra: list[str]) -> list[str]:
    opts = [f"--{k.replace('_', '-')}={v}" for k, v in {**RECIPE, "max_steps": steps, "warmup": min(100, steps // 10),
                                                         "eval_every": min(250, steps)}.items()]
    return [str(Path(sys.executable).with_name("llm_scratch_train")), *opts, "--out", str(out), "--no-progress", *extra]


def run_once(steps: int, extra: list[str], env: dict | None = None) -> dict:
    "One whole run of the recipe in a fresh process: wall time, final validation loss, precision, the run's config."
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        t0 = time.perf_counter()
        p = subprocess.run(command(steps, out, extra), capture_output=True, text=True, env={**os.environ, **(env or {})})
        wall = time.perf_counter() - t0
        if p.returncode: raise SystemExit(f"the run failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
        rows = read_metrics(out)
        cfg = json.loads((out / "config.json").read_text())
    return {"wall_s": wall, "val_loss": [r["val_loss"] for r in rows if "val_loss" in r][-1],
            "precision": cfg["precision"], "compile": cfg.get("compile")}


def run_flops(steps: int) -> float:
    "Model FLOPs of a whole run: training steps plus the validation forward passes (a third of a step's per token)."
    cfg = GPTConfig(vocab_size=65, context_length=RECIPE["context_length"], emb_dim=RECIPE["emb_dim"],
                    n_layers=RECIPE["n_layers"], n_heads=RECIPE["n_heads"])
    per_token = flops_per_token(cfg)
    tokens = steps * RECIPE["batch_size"] * RECIPE["context_length"]
    evals = steps // min(250, steps) + (steps % min(250, steps) != 0)
    val_tokens = evals * RECIPE["eval_batches"] * RECIPE["batch_size"] * RECIPE["context_length"]
    return per_token * tokens + per_token / 3 * val_tokens


def profile(extra: list[str], steps: int = 60) -> dict:
    "Milliseconds per phase of a training step (median over `steps` after warm-up), in this process."
    from llm_scratch.train import autocast, clip_grad_norm, make_accelerator, parse_args, start_run
    with tempfile.TemporaryDirectory() as tmp:
        opts = command(RECIPE["max_steps"], Path(tmp) / "run", extra)[1:]
        cfg = parse_args(opts)
        acc = make_accelerator()
        run = start_run(cfg, acc)
        task, model, opt, forward = run.task, run.model, run.optimizer, run.forward
        times = {k: [] for k in ("data", "forward", "backward", "clip", "optimizer", "loss.item")}
        for step in range(steps + 10):
            t = [time.perf_counter()]
            opt.zero_grad(set_to_none=True)
            b = task.batch(step, 0); t.append(time.perf_counter())
            with autocast(task.device, run.cfg.precision): loss = task.loss(forward, b)
            t.append(time.perf_counter())
            loss.backward(); t.append(time.perf_counter())
            clip_grad_norm(model.parameters(), run.cfg.grad_clip); t.append(time.perf_counter())
            opt.step(); t.append(time.perf_counter())
            loss.item(); t.append(time.perf_counter())
            if step >= 10:
                for k, a, b_ in zip(times, t, t[1:]): times[k].append((b_ - a) * 1e3)
        t0 = time.perf_counter(); task.evaluate(model, forward); t_eval = time.perf_counter() - t0
    out = {k: statistics.median(v) for k, v in times.items()}
    out["step"] = sum(out.values())
    out["one validation (ms)"] = t_eval * 1e3
    out["precision"], out["compile"] = run.cfg.precision, run.cfg.compile
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=RECIPE["max_steps"])
    ap.add_argument("--repeats", type=int, default=1, help="runs of each path (taking turns); the median is quoted")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "small.json"))
    args = ap.parse_args(argv)
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)", flush=True)
    peak = perf.matmul_flops(1024, torch.bfloat16)
    print(f"bf16 matrix-product peak here: {peak / 1e12:.2f} TFLOP/s", flush=True)
    runs = {name: [] for name in PATHS}
    for _ in range(args.repeats):
        cache = tempfile.mkdtemp(prefix="inductor-")  # empty for the cold run, filled by it for the warm one
        for name, extra in PATHS.items():
            r = run_once(args.steps, extra, {"TORCHINDUCTOR_CACHE_DIR": cache}); runs[name].append(r)
            print(f"{name:9} {r['wall_s']:6.1f} s  val loss {r['val_loss']:.3f}  ({r['precision']}, compile {r['compile']})", flush=True)
    wall = {n: statistics.median(r["wall_s"] for r in rs) for n, rs in runs.items()}
    flops = run_flops(args.steps)
    res = {"steps": args.steps, "peak_bf16": peak, "run_flops": flops, "runs": runs, "wall_s": wall,
           "ratio": {n: w / wall["baseline"] for n, w in wall.items()}, "mfu": {n: flops / (w * peak) for n, w in wall.items()},
           "load": os.getloadavg()[0]}
    print(f"\nsmall model (nanoGPT CPU recipe, {args.steps} steps, whole runs; MFU against {peak / 1e12:.2f} TFLOP/s bf16)")
    for n in PATHS:
        print(f"  {n:22} {wall[n]:6.1f} s  {res['ratio'][n]:5.2f} x baseline  MFU {res['mfu'][n]:4.0%}  "
              f"val loss {statistics.median(r['val_loss'] for r in runs[n]):.3f}")
    if args.profile:
        res["profile"] = {n: profile(PATHS[n]) for n in PROFILED}
        keys = [k for k in res["profile"]["baseline"] if k not in ("precision", "compile")]
        print(f"\n{'ms per step':22}" + "".join(f"{n[:20]:>22}" for n in PROFILED))
        for k in keys: print(f"{k:22}" + "".join(f"{res['profile'][n][k]:>22.2f}" for n in PROFILED))
    print(f"load: {os.getloadavg()[0]:.2f} (1 min)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(Path(args.out), lambda p: p.write_text(json.dumps(res, indent=1, default=str)))


if __name__ == "__main__":
    main()
