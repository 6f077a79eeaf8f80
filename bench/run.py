"""Our GPT against the book's reference model and Hugging Face's GPT-2, side by side in one process.

    make bench                      # installs the baselines, then runs this
    python bench/run.py             # full run, about 8-10 minutes on a quiet 2-core machine
    python bench/run.py --quick     # smoke test, under 2 minutes
    python bench/run.py --device cuda --precision bf16 --compile    # on a GPU (see bench/gpu.sh)

Measures, each as the median of several repetitions after a warm-up, the implementations taking
turns (interleaved) with the same weights, batch, threads, optimiser and autocast:

  peak      the matrix-product peak of this machine (fp32, bf16): the yardstick of the MFU
  train     training step tokens/s (forward, backward, AdamW) and MFU, per model size and precision
  levers    what each optimisation buys our model (each taken out in turn; the allocator in subprocesses)
  generate  greedy generation tokens/s with the KV cache, 20-token prompt, 200 new tokens
  data      tokenizing Tiny Shakespeare (ours vs tiktoken) and window sampling, as a share of a step

A ratio ("x anchor", "gain") is the median over rounds of the two times measured in the same
round, which cancels most of a busy machine's drift. Prints the tables and ratios, checks the
issue's targets, and writes everything as JSON to bench/results/latest.json (atomically, after
every section; --out to choose another file).
"""
from __future__ import annotations

import argparse
import copy
import gc
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
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import harness  # noqa: E402  (bench/harness.py, beside this file)
from llm_scratch import perf  # noqa: E402
from llm_scratch.data import write_atomic  # noqa: E402
from llm_scratch.model import GPTConfig, GPTModel, num_params  # noqa: E402
from llm_scratch.hardware import malloc_tuned, tune_malloc  # noqa: E402
from llm_scratch.train import make_optimizer  # noqa: E402

# model shapes: (name, GPTConfig keyword arguments); GPT-2's vocabulary throughout
SHAPES = {
    "mini": dict(emb_dim=256, n_layers=4, n_heads=4, context_length=256),
    "small": dict(emb_dim=384, n_layers=6, n_heads=6, context_length=256),  # the 6 layers x 384
    "mid": dict(emb_dim=512, n_layers=8, n_heads=8, context_length=256),
    "124M": dict(emb_dim=768, n_layers=12, n_heads=12, context_length=1024),  # GPT-2 small
}
H100_BF16_DENSE = 989e12  # NVIDIA's datasheet figure for H100/H200 SXM, dense bf16 (no sparsity)
TARGETS = dict(train_anchor=1.5, train_hf=1.2, mfu=0.5, gen_anchor=1.5, gen_hf=1.0, data=0.05)


def plan(args) -> dict:
    "What to run: train configurations, repetitions and sizes, for --quick, a full run, or CUDA."
    precisions = args.precision.split(",")
    if args.plan == "cuda" or args.device == "cuda":
        s, b, t = ("124M", 16, 1024) if args.device == "cuda" else ("mini", 2, 128)  # the CPU: a dry run of it
        return dict(train=[(s, b, t, p) for p in precisions], repeats=10 if args.device == "cuda" else 2, warmup=3,
                    lever_shape=(s, b, t), lever_repeats=5, gen=[(s, p) for p in precisions],
                    new_tokens=200, gen_repeats=3, peak_sizes=(4096, 8192) if args.device == "cuda" else (512,),
                    peak_repeats=10,
                    compile_lever=False, malloc_lever=False)  # the compiled train rows show what compile buys
    if args.quick:
        train = [(s, b, 256, p) for s, b in (("small", 2), ("124M", 1)) for p in precisions]
        return dict(train=train, repeats=3, warmup=1, lever_shape=("small", 2, 256), lever_repeats=2,
                    gen=[("124M", "fp32")], new_tokens=50, gen_repeats=2, peak_sizes=(2048,),
                    peak_repeats=3, compile_lever=args.compile, malloc_lever=False)
    train = [(s, 4, 256, p) for s in ("small", "124M") for p in precisions]
    train += [(s, 4, 256, "bf16") for s in ("mini", "mid") if "bf16" in precisions]  # for the size plot
    return dict(train=train, repeats=5, warmup=1, lever_shape=("small", 4, 256), lever_repeats=5,
                gen=[(s, p) for s in ("small", "124M") for p in precisions], new_tokens=200, gen_repeats=3,
                peak_sizes=(1024, 2048, 4096), peak_repeats=5, compile_lever=args.compile or not args.no_compile,
                malloc_lever=True)


def config(shape: str) -> GPTConfig:
    return GPTConfig(**SHAPES[shape], drop_rate=0.0)  # no dropout: as in modern pretraining, and for all alike


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def med(xs): return statistics.median(xs)


def paired(slow: list[float], fast: list[float]) -> float:
    "The median over rounds of slow/fast times measured in the same round: steadier than a ratio of medians."
    return med([a / b for a, b in zip(slow, fast)])


class Bench:
    def __init__(self, args):
        self.args, self.p = args, plan(args)
        self.dev = torch.device(args.device)
        self.sync = torch.cuda.synchronize if self.dev.type == "cuda" else (lambda: None)
        self.load = []  # (cpu s, wall s) of every timed call: how much of the machine we got
        self.clock = time.process_time if args.cpu_time else time.perf_counter
        self.res = {"train": [], "levers": [], "generate": [], "data": None, "peak": {}, "targets": []}
        self.have_anchor = self._try(lambda: harness._anchor_module(False))
        self.have_hf = self._try(lambda: __import__("transformers"))
        if not (self.have_anchor and self.have_hf):
            log("note: missing baselines:", ", ".join(n for n, ok in (("llms_from_scratch", self.have_anchor),
                                                                      ("transformers", self.have_hf)) if not ok),
                "-- `make bench` installs them; their columns stay empty")
        if self.have_hf:
            import transformers
            transformers.logging.set_verbosity_error()

    @staticmethod
    def _try(fn) -> bool:
        try: fn(); return True
        except ImportError: return False

    def time(self, fns, repeats, warmup):
        return perf.interleaved(fns, repeats, warmup, sync=self.sync, load=self.load, clock=self.clock)

    # ---- peak ------------------------------------------------------------------------------------
    def peak(self):
        for prec, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            if self.dev.type == "cuda" and prec == "fp32": torch.backends.cuda.matmul.allow_tf32 = True
            by = {n: perf.matmul_flops(n, dt, self.dev, self.p["peak_repeats"], self.clock) for n in self.p["peak_sizes"]}
            self.res["peak"][prec] = {"flops": max(by.values()), "by_size": {str(n): f for n, f in by.items()}}
            log(f"peak {prec}: " + ", ".join(f"n={n} {f / 1e9:,.0f} GFLOP/s" for n, f in by.items()))
        self.res["peak"]["bandwidth"] = perf.copy_bandwidth(1024 if self.dev.type == "cuda" else 256, self.dev,
                                                            self.p["peak_repeats"], self.clock)
        log(f"copy bandwidth: {self.res['peak']['bandwidth'] / 1e9:,.1f} GB/s (read + write)")
        if self.dev.type == "cuda":
            name = torch.cuda.get_device_name(self.dev)
            self.res["peak"]["spec"] = {"device": name, "bf16": H100_BF16_DENSE if ("H100" in name or "H200" in name)
                                        else None, "note": "H100/H200 SXM dense bf16 from NVIDIA's datasheet"}

    def peak_for(self, prec: str) -> float:
        spec = self.res["peak"].get("spec", {}).get("bf16")
        if spec and prec == "bf16": return spec  # on a H100/H200: MFU against the datasheet figure
        return self.res["peak"][prec]["flops"]

    # ---- building the contenders ----------------------------------------------------------------
    def build(self, cfg: GPTConfig, baselines=True) -> dict:
        torch.manual_seed(0)
        ours = GPTModel(cfg).to(self.dev)
        models = {"ours": (ours, ours)}
        if baselines and self.have_anchor:
            a = harness.to_anchor(ours); models["anchor"] = (a, a)
        if baselines and self.have_hf:
            h = harness.to_hf(ours); models["hf"] = (h, lambda x, h=h: h(x).logits)
        return models

    def parity(self, models: dict, cfg) -> float:
        "Largest logits difference of any baseline from ours, in fp32 eval mode."
        x = torch.randint(0, cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1)).to(self.dev)
        worst, tf32 = 0.0, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # full fp32 products for the comparison
        with torch.no_grad():
            for m, _ in models.values(): m.eval()
            ref = models["ours"][1](x)
            for k, (m, f) in models.items(): worst = max(worst, (f(x) - ref).abs().max().item())
            for m, _ in models.values(): m.train()
        torch.backends.cuda.matmul.allow_tf32 = tf32
        if worst > 1e-3: raise RuntimeError(f"the baselines do not compute our function: logits differ by {worst}")
        return worst

    # ---- training ---------------------------------------------------------------------------------
    def batch(self, cfg, b, t):
        g = torch.Generator().manual_seed(2)
        x, y = torch.randint(0, cfg.vocab_size, (2, b, t), generator=g).to(self.dev).unbind(0)
        return x, y

    def train(self, compiled: bool = False):
        "Training steps of every shape and precision of the plan; `compiled`: every contender torch.compile'd."
        for shape in dict.fromkeys(s for s, *_ in self.p["train"]):
            cfg = config(shape)
            models = self.build(cfg)
            diff = self.parity(models, cfg)
            for _, b, t, prec in (r for r in self.p["train"] if r[0] == shape):
                if compiled: log("torch.compile: every contender, compiled alike (the first steps compile)")
                x, y = self.batch(cfg, b, t)
                fused = self.dev.type == "cuda" or not self.args.no_fused
                fns = {k: perf.step_fn(torch.compile(f) if compiled else f, make_optimizer(m, 6e-4, fused=fused), x, y, prec)
                       for k, (m, f) in models.items()}
                log(f"train {shape} {prec} {b}x{t}{' compiled' if compiled else ''}: timing {', '.join(fns)} ...")
                times = self.time(fns, self.p["repeats"], self.p["warmup"] + (2 if compiled else 0))
                fpt = perf.train_flops(cfg, t)
                impls = {}
                for k, ts in times.items():
                    tps = b * t / med(ts)
                    impls[k] = {"tokens_per_s": tps, "best_tokens_per_s": b * t / min(ts), "step_s": med(ts), "steps_s": ts,
                                "params": sum(p.numel() for p in models[k][0].parameters()),
                                "mfu": perf.mfu(tps, fpt, self.peak_for(prec)),
                                "mfu_vs_measured_peak": perf.mfu(tps, fpt, self.res["peak"][prec]["flops"])}
                row = {"model": shape, "config": SHAPES[shape], "params": num_params(models["ours"][0]),
                       "batch": b, "tokens": t, "precision": prec, "flops_per_token": fpt, "fused_adamw": fused,
                       "compiled": compiled, "peak_flops": self.peak_for(prec), "logits_max_diff": diff,
                       "impls": impls, "ratios": {k: paired(times[k], times["ours"]) for k in impls if k != "ours"},
                       "ratios_of_medians": {k: impls["ours"]["tokens_per_s"] / v["tokens_per_s"]
                                             for k, v in impls.items() if k != "ours"}}
                self.res["train"].append(row)
                self.save()
                log("   " + ", ".join(f"{k} {v['tokens_per_s']:,.0f} tok/s (MFU {v['mfu']:.0%})" for k, v in impls.items()))
                for m, _ in models.values(): m.zero_grad(set_to_none=True)
                del fns; gc.collect()
            del models; gc.collect()

    # ---- levers -----------------------------------------------------------------------------------
    def levers(self):
        shape, b, t = self.p["lever_shape"]
        prec = "bf16" if "bf16" in self.args.precision else self.args.precision.split(",")[0]
        cfg = config(shape)
        x, y = self.batch(cfg, b, t)
        torch.manual_seed(0)
        ours = GPTModel(cfg).to(self.dev)
        rows = []
        def pair(lever, with_fn, without_fn, note="", precision=prec):
            log(f"lever {lever} ({shape} {precision}) ...")
            ts = self.time({"with": with_fn, "without": without_fn}, self.p["lever_repeats"], self.p["warmup"])
            w, wo = (b * t / med(ts[k]) for k in ("with", "without"))
            rows.append({"lever": lever, "model": shape, "precision": precision, "batch": b, "tokens": t,
                         "with": w, "without": wo, "gain": paired(ts["without"], ts["with"]), "note": note,
                         "intrinsic": True, "steps_s": ts})
            log(f"   with {w:,.0f} tok/s, without {wo:,.0f}: {rows[-1]['gain']:.2f}x")
        fused = self.dev.type == "cuda" or not self.args.no_fused
        base = perf.step_fn(ours, make_optimizer(ours, 6e-4, fused=fused), x, y, prec)
        for key, label in perf.LEVERS.items():
            if key == "sdpa_choice" and (self.dev.type != "cpu" or prec != "bf16"): continue  # the same model there
            p_key = "fp32" if key == "sdpa" and self.dev.type == "cpu" else prec  # bf16 on a CPU: explicit anyway
            other = perf.variant(ours, key)
            ref = base if p_key == prec else perf.step_fn(ours, make_optimizer(ours, 6e-4, fused=fused), x, y, p_key)
            pair(label, ref, perf.step_fn(other, make_optimizer(other, 6e-4, fused=fused), x, y, p_key), precision=p_key)
            del other, ref; gc.collect()
        twin = copy.deepcopy(ours)
        pair("fused AdamW", base, perf.step_fn(twin, make_optimizer(twin, 6e-4, fused=False), x, y, prec))
        rows[-1]["intrinsic"] = False
        if prec == "bf16":
            pair("bf16 autocast (vs fp32)", base, perf.step_fn(twin, make_optimizer(twin, 6e-4, fused=fused), x, y, "fp32"))
            rows[-1]["intrinsic"] = False
        del twin; gc.collect()
        if self.p["compile_lever"]:
            try:
                t0 = time.perf_counter()
                cstep = perf.step_fn(torch.compile(ours), make_optimizer(ours, 6e-4, fused=fused), x, y, prec)
                cstep(); self.sync()
                compile_s = time.perf_counter() - t0
                log(f"   torch.compile: first step {compile_s:.0f} s")
                pair("torch.compile", cstep, base, note=f"first step (compiling) {compile_s:.0f} s")
                rows[-1]["intrinsic"], rows[-1]["compile_s"] = False, compile_s
            except Exception as e:  # e.g. no C++ compiler for inductor on this CPU machine
                log(f"   torch.compile failed, lever skipped: {type(e).__name__}: {str(e)[:200]}")
        if self.p["malloc_lever"] and self.dev.type == "cpu":
            rows.append(self.malloc_lever(shape, b, t, prec))
        self.res["levers"] = rows

    def malloc_lever(self, shape, b, t, prec) -> dict:
        "The allocator settings, measured in fresh processes (glibc reads them at start), alternately."
        log(f"lever glibc malloc ({shape} {prec}, subprocesses) ...")
        env_off = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env_on = {**env_off, "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
        got = {"with": [], "without": []}
        for _ in range(2):
            for k, env in (("without", env_off), ("with", env_on)):
                cmd = [sys.executable, __file__, "--probe", f"{shape},{b},{t},{prec}", "--threads", str(self.args.threads)]
                if self.args.cpu_time: cmd.append("--cpu-time")
                if k == "without": cmd.append("--no-tune-malloc")
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
                got[k].append(json.loads(out.strip().splitlines()[-1])["tokens_per_s"])
        w, wo = med(got["with"]), med(got["without"])
        gain = paired(got["with"], got["without"])  # tokens/s: with / without, child by child
        log(f"   with {w:,.0f} tok/s, without {wo:,.0f}: {gain:.2f}x")
        return {"lever": "glibc malloc settings", "model": shape, "precision": prec, "batch": b, "tokens": t,
                "with": w, "without": wo, "gain": gain, "intrinsic": False, "runs": got,
                "note": "two fresh processes each: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11 vs glibc defaults"}

    # ---- generation -------------------------------------------------------------------------------
    def generate(self):
        from llm_scratch.generate import generate
        from llm_scratch.hardware import decode_layout
        n = self.p["new_tokens"]
        for shape, prec in self.p["gen"]:
            cfg = config(shape)
            dt = torch.bfloat16 if prec == "bf16" else torch.float32
            torch.manual_seed(0)
            ours = GPTModel(cfg).to(self.dev).eval()
            def ours_generate(m, n):
                with decode_layout(m): return generate(m, prompt, n)  # fp32 on a CPU: (in, out) weights; the re-layout is timed
            fns = {"ours": ours_generate}
            models = {"ours": ours}
            if self.have_anchor:
                models["anchor"] = harness.to_anchor(ours, kv_cache=True).eval()
                fns["anchor"] = lambda m, n: harness.anchor_generate(m, prompt, n)
            if self.have_hf:
                models["hf"] = harness.to_hf(ours).eval()
                fns["hf"] = lambda m, n: harness.hf_generate(m, prompt, n)
            models = {k: m.to(dt) for k, m in models.items()}  # bf16: the weights themselves, for all
            prompt = torch.randint(0, cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3)).to(self.dev)
            outs = {}
            def runner(k):
                def run(): outs[k] = fns[k](models[k], n)
                return run
            log(f"generate {shape} {prec}, {n} new tokens: timing {', '.join(models)} ...")
            for k in models: fns[k](models[k], 10)  # warm-up: a short run is enough
            times = self.time({k: runner(k) for k in models}, self.p["gen_repeats"], 0)
            impls = {}
            for k, ts in times.items():
                new = outs[k][0, 20:]
                assert new.numel() == n, f"{k} made {new.numel()} tokens, not {n}"
                impls[k] = {"tokens_per_s": n / med(ts), "run_s": ts,
                            "agree": (new == outs["ours"][0, 20:]).float().mean().item()}
            wb = sum(p.numel() * p.element_size() for p in models["ours"].parameters())
            self.res["generate"].append({
                "model": shape, "precision": prec, "params": num_params(ours), "prompt": 20, "new_tokens": n,
                "weight_bytes": wb, "bound_tokens_per_s": self.res["peak"]["bandwidth"] / wb,
                "impls": impls, "ratios": {k: paired(times[k], times["ours"]) for k in impls if k != "ours"}})
            log("   " + ", ".join(f"{k} {v['tokens_per_s']:,.1f} tok/s" for k, v in impls.items()))
            del models, ours; gc.collect()

    # ---- data -------------------------------------------------------------------------------------
    def data(self):
        from llm_scratch.data import fetch
        from llm_scratch.text import BPETokenizer, gpt2_tokenizer
        from llm_scratch.tokens import WindowSampler, load_tokens, token_file
        text = fetch("tinyshakespeare", progress=False).read_text(encoding="utf-8")
        ref, ours = gpt2_tokenizer(), BPETokenizer.from_gpt2()
        reps = 1 if self.args.quick else 3
        def cold(): ours._cache.clear(); return ours.encode(text)
        t_ours = [self._wall(cold) for _ in range(reps)]
        t_ref = [self._wall(lambda: ref.encode_ordinary(text)) for _ in range(reps)]
        ids = ref.encode_ordinary(text)
        assert cold() == ids, "our BPE and tiktoken disagree on Tiny Shakespeare"
        with tempfile.TemporaryDirectory() as tmp:
            path, meta = token_file("tinyshakespeare", "gpt2", cache=tmp)
            tokens = load_tokens(path)
            shape, b, t, prec = next((r for r in self.p["train"] if r[0] == "124M"), self.p["train"][-1])
            s = WindowSampler(tokens, t, b)
            t_sample = [self._wall(lambda i=i: s.batch(i)) for i in range(200)]
            del tokens
        rows = [r for r in self.res["train"] if (r["model"], r["batch"], r["tokens"]) == (shape, b, t)]
        step = min(rows, key=lambda r: r["impls"]["ours"]["step_s"]) if rows else None  # the fastest: the largest share
        step_s = step["impls"]["ours"]["step_s"] if step else None
        sample_s = med(t_sample)
        self.res["data"] = {"chars": len(text), "tokens": len(ids), "tokenize_ours_s": med(t_ours),
                            "tokenize_tiktoken_s": med(t_ref), "ratio_ours_tiktoken": med(t_ours) / med(t_ref),
                            "model": shape, "batch": b, "context": t, "step_precision": step and step["precision"],
                            "sample_ms": sample_s * 1e3, "step_ms": step_s and step_s * 1e3,
                            "sample_share": sample_s / step_s if step_s else None,
                            "tokenize_in_steps": med(t_ref) / step_s if step_s else None}
        log(f"data: tokenize ours {med(t_ours):.2f} s, tiktoken {med(t_ref):.2f} s; sample {sample_s * 1e3:.2f} ms/batch")

    @staticmethod
    def _wall(fn):
        t0 = time.perf_counter(); fn(); return time.perf_counter() - t0

    # ---- targets ----------------------------------------------------------------------------------
    def targets(self):
        out = []
        def add(name, value, want, op=">=", unit="x"):
            met = None if value is None else (value >= want if op == ">=" else value < want)
            out.append({"name": name, "value": value, "want": want, "op": op, "unit": unit, "met": met})
        big = [r for r in self.res["train"] if r["model"] == "124M"] or self.res["train"]
        for r in big:
            tag = f"{r['model']}{' compiled' if r.get('compiled') else ''} {r['precision']}"
            add(f"train tok/s vs anchor ch04 ({tag})", r["ratios"].get("anchor"), TARGETS["train_anchor"])
            add(f"train tok/s vs HF GPT-2 ({tag})", r["ratios"].get("hf"), TARGETS["train_hf"])
            add(f"train MFU, ours ({tag})", r["impls"]["ours"]["mfu"], TARGETS["mfu"], unit="%")
        gen = [r for r in self.res["generate"] if r["model"] == "124M"] or self.res["generate"]
        for r in gen:
            tag = f"{r['model']} {r['precision']}"
            add(f"generate tok/s vs anchor kv_cache ({tag})", r["ratios"].get("anchor"), TARGETS["gen_anchor"])
            add(f"generate tok/s vs HF generate ({tag})", r["ratios"].get("hf"), TARGETS["gen_hf"])
        if self.res["data"]:
            add("window sampling / training step", self.res["data"]["sample_share"], TARGETS["data"], "<", "%")
        self.res["targets"] = out

    def save(self, final: bool = False):
        "Write the results so far (atomically): a run cut short still leaves its finished sections."
        self.res["meta"] = {**self.meta(time.perf_counter() - self.t0), "complete": final}
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, lambda p: p.write_text(json.dumps(self.res, indent=1) + "\n"))

    # ---- everything -------------------------------------------------------------------------------
    def meta(self, elapsed: float) -> dict:
        cpu = sum(c for c, _ in self.load); wall = sum(w for _, w in self.load)
        share = cpu / (wall * torch.get_num_threads()) if wall and self.dev.type == "cpu" else None
        m = harness.machine_info(self.dev)
        mode = "cuda" if self.dev.type == "cuda" else "cuda plan on cpu (dry run)" if self.args.plan else \
            "quick" if self.args.quick else "full"
        m.update(mode=mode,
                 elapsed_s=elapsed, cpu_share=share, malloc=self.malloc, sections=self.args.sections,
                 compile=bool(self.args.compile), command=" ".join(sys.argv),
                 clock="process CPU time" if self.args.cpu_time else "wall clock")
        if self.args.cpu_time:
            m["load_note"] = (f"timed in CPU time with {torch.get_num_threads()} thread(s): tokens/s of the CPU work, "
                              f"steady on a busy machine (the timed code got {share or 0:.0%} of its threads' time)")
        elif share is None: m["load_note"] = ""
        elif share < 0.85:
            m["load_note"] = (f"BUSY MACHINE: the timed code got {share:.0%} of {torch.get_num_threads()} threads' "
                              "CPU time; absolute figures are low and noisy, ratios less so (interleaved)")
        else: m["load_note"] = f"the timed code got {share:.0%} of {torch.get_num_threads()} threads' CPU time"
        return m

    def run(self):
        self.t0 = time.perf_counter()
        if malloc_tuned(): self.malloc = "MALLOC_MMAP_MAX_=0 in the environment"
        elif not self.args.no_tune_malloc and tune_malloc(): self.malloc = "tuned by tune_malloc()"
        else: self.malloc = "glibc defaults"
        sections = self.args.sections.split(",")
        self.peak()  # always: the MFU needs it
        for name in ("train", "levers", "generate", "data"):
            if name in sections and not (name == "data" and self.dev.type != "cpu"):
                getattr(self, name)(); self.targets(); self.save()
        if "train" in sections and self.args.compile and (self.dev.type == "cuda" or self.args.plan):
            try: self.train(compiled=True)  # last: compiling takes the longest
            except Exception as e: log(f"torch.compile'd training failed: {type(e).__name__}: {str(e)[:300]}")
            self.targets(); self.save()
        self.save(final=True)
        return self.res


def probe(args):
    "One child process of the allocator lever: our model's training step tokens/s, as JSON on stdout."
    shape, b, t, prec = args.probe.split(",")
    b, t = int(b), int(t)
    if not args.no_tune_malloc and not malloc_tuned(): tune_malloc()
    cfg = config(shape)
    torch.manual_seed(0)
    m = GPTModel(cfg)
    x, y = torch.randint(0, cfg.vocab_size, (2, b, t), generator=torch.Generator().manual_seed(2)).unbind(0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    ts = perf.interleaved({"ours": perf.step_fn(m, make_optimizer(m, 6e-4, fused=True), x, y, prec)}, 3, 2,
                          clock=clock)["ours"]
    print(json.dumps({"tokens_per_s": b * t / med(ts), "steps_s": ts}))


def report(res: dict) -> str:
    m = res["meta"]
    head = (f"# llm_scratch benchmark, {m['date']}, {m['machine']}, {m['threads']} threads, torch {m['torch']}, "
            f"transformers {m.get('transformers')}, llms-from-scratch {m.get('llms_from_scratch')}; mode {m['mode']}, "
            f"allocator: {m['malloc']}, {m['elapsed_s']:.0f} s")
    parts = [head]
    if m.get("load_note"): parts.append(f"# {m['load_note']}")
    pk = res["peak"]
    parts.append("matmul peak (measured): " + ", ".join(f"{p} {pk[p]['flops'] / 1e9:,.0f} GFLOP/s" for p in ("fp32", "bf16"))
                 + f"; copy bandwidth {pk['bandwidth'] / 1e9:,.1f} GB/s"
                 + (f"; MFU in bf16 against {pk['spec']['bf16'] / 1e12:.0f} TFLOP/s ({pk['spec']['note']})"
                    if pk.get("spec", {}).get("bf16") else ""))
    if res["train"]: parts += ["", "## training step (forward + backward + AdamW), tokens/s", harness.train_table(res)]
    if res["levers"]: parts += ["", "## what each optimisation buys our model", harness.lever_table(res)]
    if res["generate"]: parts += ["", "## greedy generation with KV cache, batch 1, tokens/s", harness.generate_table(res)]
    d = res["data"]
    if d:
        parts += ["", "## data pipeline",
                  f"tokenize Tiny Shakespeare ({d['chars']:,} chars -> {d['tokens']:,} tokens): ours "
                  f"{d['tokenize_ours_s']:.2f} s, tiktoken {d['tokenize_tiktoken_s']:.2f} s ({d['ratio_ours_tiktoken']:.1f}x)",
                  f"sample a {d['batch']}x{d['context']} batch from the memmapped token file: {d['sample_ms']:.2f} ms = "
                  + (f"{d['sample_share']:.2%} of a {d['model']} {d['step_precision']} training step ({d['step_ms']:.0f} ms)"
                     if d["sample_share"] is not None else "(no training step measured)")]
    if res["targets"]: parts += ["", "## targets", harness.target_table(res)]
    return "\n".join(parts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small batches, few repetitions: a smoke test (< 2 min)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16 (autocast)")
    ap.add_argument("--compile", action="store_true", help="torch.compile (CUDA: every contender; CPU: the lever)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile lever of a full CPU run")
    ap.add_argument("--no-fused", action="store_true", help="plain (foreach) AdamW instead of the fused one")
    ap.add_argument("--sections", default="train,levers,generate,data")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    ap.add_argument("--no-tune-malloc", action="store_true", help="leave glibc's allocator at its defaults")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time, with 1 thread unless --threads is given: "
                         "steady figures on a machine shared with other work (a tokens/s per core)")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--plan", choices=["cuda"], help=argparse.SUPPRESS)  # --plan cuda on a CPU: a dry run of gpu.sh
    args = ap.parse_args(argv)
    for p in args.precision.split(","):
        if p not in ("fp32", "bf16"): ap.error(f"--precision: {p!r} is not fp32 or bf16")
    if args.device == "cuda" and not torch.cuda.is_available(): ap.error("--device cuda: no CUDA device is visible")
    if args.threads is None: args.threads = 1 if args.cpu_time else min(torch.get_num_threads(), os.cpu_count() or 1)
    if args.cpu_time and args.device == "cuda": ap.error("--cpu-time measures CPU work; it means nothing on CUDA")
    torch.set_num_threads(args.threads)
    if args.probe: return probe(args)
    res = Bench(args).run()
    print(report(res))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
