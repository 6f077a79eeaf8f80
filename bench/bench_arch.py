"""GPT-2's architecture against Llama's, at the same parameter count and the same wall-clock budget.

    .venv/bin/python bench/bench_arch.py                 # 2 x 150 s of training, ~6 minutes
    .venv/bin/python bench/bench_arch.py --seconds 20    # a quick look (figures not comparable)

Both models read Tiny Shakespeare by character (the same tokens, the same 90/10 split, the same random windows from
the same seed), 6 blocks of width 192, context 128, no dropout, and train with the same AdamW (lr 1e-3 with 20
warmup steps and a cosine to 1e-4, weight decay 0.1, clipping at 1), float32, batch 32. The GPT-2 model has
LayerNorm, GELU, learned positions and 6 attention heads with their own keys and values; the Llama model has
RMSNorm, SwiGLU, RoPE, and 6 query heads sharing 2 key/value heads, with SwiGLU's width chosen so that the two
models have the same number of parameters (to within one SwiGLU column). Each trains for the same number of
seconds: its step time is measured first, and its cosine spans the steps that fit. The validation loss
(20 fixed batches) is recorded against steps, tokens and seconds.

Writes bench/results/arch.json (atomically); the chapter "Today's open models" plots it. Check `uptime` before
and after: nothing else may share the cores.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if (ROOT.parent / "shared" / "data").is_dir(): os.environ.setdefault("LLM_SCRATCH_DATA", str(ROOT.parent / "shared" / "data"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm_scratch.data import write_atomic  # noqa: E402
from llm_scratch.llama import LlamaConfig, LlamaModel  # noqa: E402
from llm_scratch.model import GPTConfig, GPTModel  # noqa: E402
from llm_scratch.pretrain import calc_loss_batch, warmup_cosine  # noqa: E402
from llm_scratch.tokens import load_tokens, token_file  # noqa: E402

D, L, HEADS, CTX, BATCH = 192, 6, 6, 128, 32


def models(vocab: int) -> dict:
    "The two models, built with the same seed, at (nearly) the same parameter count."
    gpt_cfg = GPTConfig(vocab_size=vocab, context_length=CTX, emb_dim=D, n_heads=HEADS, n_layers=L, drop_rate=0.0)
    torch.manual_seed(0); gpt = GPTModel(gpt_cfg)
    n_gpt = sum(p.numel() for p in gpt.parameters())
    base = LlamaConfig(vocab_size=vocab, context_length=CTX, emb_dim=D, n_layers=L, n_heads=HEADS, n_kv_heads=2,
                       hidden_dim=8, rope_theta=10_000.0, rope_scaling=None)
    per_col = 3 * D * L  # parameters one more SwiGLU column adds across the model
    n0 = sum(p.numel() for p in LlamaModel(base).parameters())
    hidden = 8 + round((n_gpt - n0) / per_col)
    torch.manual_seed(0); llama = LlamaModel(base.replace(hidden_dim=hidden))
    return {"GPT-2 style": gpt, "Llama style": llama}


def batches(tokens: np.ndarray, n: int, seed: int):
    "`n` batches of random windows, the same for every model."
    g = np.random.default_rng(seed)
    for _ in range(n):
        s = g.integers(0, len(tokens) - CTX - 1, BATCH)
        w = torch.from_numpy(np.stack([tokens[i:i + CTX + 1] for i in s]).astype(np.int64))
        yield w[:, :-1], w[:, 1:]


@torch.no_grad()
def val_loss(model, val) -> float:
    model.eval()
    out = float(np.mean([calc_loss_batch(x, y, model).item() for x, y in val]))
    model.train()
    return out


def race(name: str, model, train_tokens, val, seconds: float, eval_every: int) -> dict:
    "Train `model` for about `seconds`: the step time measured on 5 steps, then a cosine over the steps that fit."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    probe = torch.optim.AdamW(model.parameters(), lr=0.0)  # timing steps that change nothing (lr 0, no decay)
    for g in probe.param_groups: g["weight_decay"] = 0.0
    t = time.perf_counter()
    for x, y in batches(train_tokens, 5, 99):
        probe.zero_grad(); calc_loss_batch(x, y, model).backward(); probe.step()
    steps = max(eval_every, int(seconds / ((time.perf_counter() - t) / 5)))
    rows, trained = [{"step": 0, "seconds": 0.0, "tokens": 0, "val_loss": val_loss(model, val)}], 0.0
    for step, (x, y) in enumerate(batches(train_tokens, steps, 1), start=1):
        t = time.perf_counter()
        for g in opt.param_groups: g["lr"] = warmup_cosine(step - 1, 1e-3, steps, 20, 1e-4)
        opt.zero_grad(set_to_none=True)
        calc_loss_batch(x, y, model).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        trained += time.perf_counter() - t  # training time only: batches and evaluations are left out
        if step % eval_every == 0 or step == steps:
            rows.append({"step": step, "seconds": trained, "tokens": step * BATCH * CTX, "val_loss": val_loss(model, val)})
            print(f"{name:12} step {step:5d}  {trained:6.1f} s  val {rows[-1]['val_loss']:.4f}", flush=True)
    return {"name": name, "parameters": sum(p.numel() for p in model.parameters()), "steps": steps, "curve": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=150)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "arch.json"))
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    path, meta = token_file("tinyshakespeare", "char")
    tokens = np.asarray(load_tokens(path))
    n = int(len(tokens) * 0.9)
    val = list(batches(tokens[n:], 20, 7))
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f}")
    runs = [race(name, m, tokens[:n], val, a.seconds, a.eval_every) for name, m in models(meta["vocab_size"]).items()]
    result = {"seconds": a.seconds, "batch": BATCH, "context": CTX, "width": D, "layers": L, "runs": runs,
              "load_before": load, "load_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"load average after: {result['load_after']:.2f}")
    write_atomic(Path(a.out), lambda tmp: tmp.write_text(json.dumps(result, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
