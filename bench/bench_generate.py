"""Greedy generation speed with and without the KV cache, in one process.

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 .venv/bin/python bench/bench_generate.py

Prints tokens/s (median of --repeats runs after a warm-up) for each model shape and the ratio
cached / uncached. Both paths produce the same tokens (asserted here too).
"""
import argparse
import platform
import statistics
import time

import torch

from llm_scratch.generate import generate
from llm_scratch.model import GPTConfig, GPTModel


def run(model, prompt, new, use_cache):
    t0 = time.perf_counter()
    out = generate(model, prompt, new, use_cache=use_cache)
    return time.perf_counter() - t0, out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,gpt2-small", help="comma-separated GPTConfig presets")
    ap.add_argument("--prompt", type=int, default=20, help="prompt tokens")
    ap.add_argument("--new", type=int, default=200, help="new tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"fp32, batch 1, prompt {args.prompt}, {args.new} new tokens, median of {args.repeats}")
    print(f"{'model':12} {'params':>8} {'uncached tok/s':>15} {'cached tok/s':>13} {'speed-up':>9}")
    for name in args.models.split(","):
        torch.manual_seed(0)
        model = GPTModel(GPTConfig.from_preset(name, drop_rate=0.0)).eval()
        prompt = torch.randint(0, model.cfg.vocab_size, (1, args.prompt))
        res = {}
        for use_cache in (False, True):
            run(model, prompt, 5, use_cache)  # warm-up
            times, outs = zip(*(run(model, prompt, args.new, use_cache) for _ in range(args.repeats)))
            res[use_cache] = (args.new / statistics.median(times), outs[0])
        assert torch.equal(res[False][1], res[True][1]), "cached and uncached tokens differ"
        n = sum(p.numel() for p in model.parameters())
        print(f"{name:12} {n / 1e6:7.1f}M {res[False][0]:15.1f} {res[True][0]:13.1f} {res[True][0] / res[False][0]:8.1f}x")


if __name__ == "__main__":
    main()
