"""Batch-1 decoding of a GPT-2-small-shaped model against the memory bound: float32, bfloat16 and int8 weights.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 .venv/bin/python bench/bench_int8.py   # ~2 minutes

One process, greedy decoding with the KV cache (`generate`), a 20-token prompt, --new tokens, median of --repeats
after a warm-up, the three precisions taking turns (`perf.interleaved`). For each precision: tokens/s, the bytes of the weights one token reads (every matrix, the head
included, norms and biases; the embedding tables are only indexed), the bound (copy bandwidth / those bytes, the
bandwidth measured in the same run) and the fraction of it reached, and the share of new tokens equal to float32's.
float32 and bfloat16 run inside `decode_layout` (appendix "The machine underneath"); int8 is `quantize_int8`
(appendix "How fast is it?"). Writes bench/results/int8.json (atomically). Check `uptime` before and after.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.harness import machine_info  # noqa: E402
from llm_scratch.data import write_atomic  # noqa: E402
from llm_scratch.generate import generate  # noqa: E402
from llm_scratch.hardware import decode_layout, tune_malloc  # noqa: E402
from llm_scratch.model import GPTConfig, GPTModel, LayerNorm  # noqa: E402
from llm_scratch.perf import Int8Linear, copy_bandwidth, interleaved, quantize_int8  # noqa: E402


def bytes_per_token(model: torch.nn.Module) -> int:
    "Bytes of the weights one decoding step reads: matrices (the head too), biases and norms; not the embedding tables."
    seen, total = set(), 0
    for m in model.modules():
        if not isinstance(m, (torch.nn.Linear, Int8Linear, LayerNorm)): continue  # tables are only indexed; masks are not weights
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            if t.data_ptr() not in seen: seen.add(t.data_ptr()); total += t.numel() * t.element_size()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--new", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "int8.json"))
    a = ap.parse_args(argv)
    tune_malloc()
    bandwidth = copy_bandwidth(256, repeats=5)
    torch.manual_seed(0)
    fp32 = GPTModel(GPTConfig.from_preset(a.model, drop_rate=0.0)).eval()
    models = {"fp32": fp32, "bf16": GPTModel(fp32.cfg).eval(), "int8": quantize_int8(fp32)}
    models["bf16"].load_state_dict(fp32.state_dict()); models["bf16"].to(torch.bfloat16)
    prompt = torch.randint(0, fp32.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    out = {}
    def decode(name, n):
        with decode_layout(models[name]): out[name] = generate(models[name], prompt, n)
    for name in models: decode(name, 5)  # warm-up: the kernels, and row_product's choice for bf16
    times = interleaved({name: partial(decode, name, a.new) for name in models}, repeats=a.repeats, warmup=0)
    rows, ref = [], None
    for name, m in models.items():
        new = out[name][0, 20:]  # greedy: the same tokens in every timed run
        ref = new if ref is None else ref
        tps, wb = a.new / statistics.median(times[name]), bytes_per_token(m)
        rows.append({"precision": name, "tokens_per_s": tps, "run_s": times[name], "weight_bytes": wb,
                     "bound_tokens_per_s": bandwidth / wb, "of_bound": tps / (bandwidth / wb),
                     "same_tokens_as_fp32": (new == ref).float().mean().item()})
        print(f"{name:5} {tps:7.1f} tok/s   {wb / 1e6:7.1f} MB per token   bound {bandwidth / wb:7.1f} tok/s   "
              f"{tps / (bandwidth / wb):5.0%} of it   same tokens as fp32 {rows[-1]['same_tokens_as_fp32']:.0%}")
    base = rows[0]["tokens_per_s"]
    for r in rows[1:]: print(f"{r['precision']} / fp32: {r['tokens_per_s'] / base:.2f}x")
    res = {"info": machine_info(), "model": a.model, "params": sum(p.numel() for p in fp32.parameters()),
           "new_tokens": a.new, "repeats": a.repeats, "bandwidth": bandwidth, "rows": rows}
    write_atomic(Path(a.out), lambda tmp: Path(tmp).write_text(json.dumps(res, indent=1)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
