"""Every parallel strategy of the trainer on 1, 2 and 4 CPU processes, for one model: tokens/s and bytes per process.

    .venv/bin/python bench/bench_parallel.py               # 15 runs, ~10 minutes on 2 cores
    .venv/bin/python bench/bench_parallel.py --steps 20    # a quick look (figures not comparable)

The model is nanoGPT's character-level CPU recipe (4 blocks of 128, 4 heads, context 64, Tiny Shakespeare by
character, no dropout), trained in float32 for `--steps` steps at a global batch of 16 windows, whatever the
layout: data-parallel strategies give each of N processes 16/N windows, a tensor-parallel group or a pipeline
reads all 16, a 2 x 2 mesh gives each of its two groups 8. Each run is `llm_scratch_train` under torchrun, in
fresh processes of one thread each (the 1-process run has both cores). From each run's `run.json`:
the median tokens/s and, per process, the bytes of parameters, gradients and AdamW state it holds (measured
from the tensors by `distributed.holdings`), and the last training loss (the same for every layout: they are
one computation, cut differently).

On 2 cores, more processes never run faster: the point is what each process holds, and what the
communication costs; the chapter Parallelism quotes this table (bench/results/parallel.json) beside the
arithmetic for GPT-2 XL on 8 GPUs. Check `uptime` before and after: nothing else may share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "data").is_dir(): os.environ.setdefault("LLM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))

from llm_scratch.data import write_atomic  # noqa: E402
from llm_scratch.distributed import free_port  # noqa: E402

GLOBAL_BATCH = 16
MODEL = ["--model", "tiny", "--n-layers", "4", "--emb-dim", "128", "--n-heads", "4", "--context-length", "64",
         "--dropout", "0", "--data", "tinyshakespeare", "--tokenizer", "char", "--precision", "fp32",
         "--compile", "off", "--lr", "1e-3", "--warmup", "5", "--eval-every", "0", "--no-progress"]
# name, processes, options (the batch size is set from the global batch and the data-parallel degree)
RUNS = [("1 process", 1, [], 1),
        *[(name, n, opts, n // mp) for n in (2, 4) for name, opts, mp in [
            ("DDP", [], 1), ("ZeRO-1", ["--zero", "1"], 1), ("ZeRO-2", ["--zero", "2"], 1),
            ("FSDP (ZeRO-3)", ["--strategy", "fsdp"], 1),
            ("tensor parallel", ["--strategy", "tp"], n), ("pipeline, 1F1B", ["--strategy", "pp", "--micro-batches", "4"], n)]],
        ("tensor 2 x data 2", 4, ["--strategy", "tp", "--tp-size", "2"], 2),
        ("pipeline 2 x data 2", 4, ["--strategy", "pp", "--pp-size", "2", "--micro-batches", "4"], 2)]


def run(name: str, nproc: int, opts: list[str], dp: int, steps: int, folder: Path) -> dict:
    "One run of the trainer; its speed, the bytes each process held and its last loss."
    out = folder / f"{nproc}-{name.replace(' ', '_').replace('(', '').replace(')', '')}"
    args = MODEL + opts + ["--batch-size", str(GLOBAL_BATCH // dp), "--max-steps", str(steps), "--log-every",
                           str(max(1, steps // 10)), "--save-every", "0", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = ([sys.executable, "-m", "llm_scratch.train"] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
            str(free_port()), "-m", "llm_scratch.train"]) + args
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode: raise RuntimeError(f"{name} on {nproc} failed:\n{p.stderr[-3000:]}")
    s = json.loads((out / "run.json").read_text())
    held = [4 * (r["parameters"] + r["gradients"] + r["optimizer_state"]) for r in s["ranks"]]
    row = {"name": name, "processes": nproc, "data_parallel": dp, "tokens_per_s": s["tokens_per_s"],
           "bytes_per_process": held, "parameters": s["parameters"], "final_loss": s["final_loss"],
           "vocab_size": json.loads((out / "final" / "config.json").read_text())["vocab_size"],
           "wall_s": time.perf_counter() - t}
    print(f"{name:22} {nproc} {row['tokens_per_s']:8,.0f} tok/s  {max(held) / 1e6:6.2f} MB max per process "
          f"({', '.join(f'{b / 1e6:.2f}' for b in held)})  loss {row['final_loss']:.4f}  {row['wall_s']:.0f} s", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "parallel.json"))
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(name, n, opts, dp, a.steps, Path(tmp)) for name, n, opts, dp in RUNS]
    result = {"steps": a.steps, "global_batch": GLOBAL_BATCH, "model": " ".join(MODEL), "rows": rows,
              "load_before": load, "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
    print(f"load average after: {result['load_after']:.2f}")
    write_atomic(Path(a.out), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
