"""Our pure-Python BPE against tiktoken (Rust) on Tiny Shakespeare: median timings, ratios from the same run.

    python bench/bench_tokenizer.py [--repeats 5] [--naive]

Encoding is timed cold (our per-tokenizer cache of pre-tokens emptied before each run) and warm.
`--naive` also times the naive trainer once (about 17 s on a 2-core machine).
"""
import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("LLM_SCRATCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

from llm_scratch.data import fetch
from llm_scratch.text import BPETokenizer, count_words, gpt2_tokenizer, train_bpe, train_bpe_naive


def median_time(fn, repeats: int, setup=lambda: None) -> float:
    "The median wall time of `fn()` over `repeats` runs, `setup()` run untimed before each."
    times = []
    for _ in range(repeats):
        setup()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--naive", action="store_true", help="also time the naive trainer (slow)")
    args = ap.parse_args()

    text = fetch("tinyshakespeare").read_text(encoding="utf-8")
    ref, ours = gpt2_tokenizer(), BPETokenizer.from_gpt2()
    assert ours.encode(text) == ref.encode(text), "the tokenizers disagree"
    print(f"Tiny Shakespeare: {len(text):,} characters, {len(ref.encode(text)):,} GPT-2 tokens; "
          f"median of {args.repeats} runs")

    t_ref = median_time(lambda: ref.encode(text), args.repeats)
    t_cold = median_time(lambda: ours.encode(text), args.repeats, setup=ours._cache.clear)
    t_warm = median_time(lambda: ours.encode(text), args.repeats)
    t_load = median_time(BPETokenizer.from_gpt2, args.repeats)
    print(f"encode  tiktoken            {t_ref * 1e3:8.1f} ms   1.0x")
    print(f"encode  ours, cold cache    {t_cold * 1e3:8.1f} ms  {t_cold / t_ref:4.1f}x")
    print(f"encode  ours, warm cache    {t_warm * 1e3:8.1f} ms  {t_warm / t_ref:4.1f}x")
    print(f"load    BPETokenizer.from_gpt2 {t_load * 1e3:5.1f} ms")

    t_train = median_time(lambda: BPETokenizer.train(text, 1000), args.repeats)
    words = count_words(text)
    t_fast = median_time(lambda: train_bpe(words, 999), args.repeats)
    print(f"train   BPETokenizer.train(text, 1000), all of it   {t_train:6.2f} s")
    print(f"train   train_bpe (merges only, 743)                {t_fast:6.2f} s   1.0x")
    if args.naive:
        t_naive = median_time(lambda: train_bpe_naive(words, 999), 1)
        print(f"train   train_bpe_naive (merges only, 743, 1 run)   {t_naive:6.2f} s  {t_naive / t_fast:4.1f}x")


if __name__ == "__main__":
    main()
