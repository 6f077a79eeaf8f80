"""The benchmark's harness: the two baselines built with our weights (Hugging Face's GPT-2 and the book's reference
model, `llms_from_scratch`), their greedy decoding, the machine description, the result file and the tables.

It is not part of the package: `bench/run.py` and the appendix "How fast is it?" import it from here. What the
appendix teaches (fair timing, the matmul peak, MFU, one training step, the optimisations taken out) stays in
`llm_scratch.perf`.
"""
from __future__ import annotations

import json
import os
import platform
import time
import types
from pathlib import Path

import torch
import torch.nn as nn

from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.weights import config_to_hf, hf_state_dict

def to_hf(model: GPTModel):
    "A Hugging Face `GPT2LMHeadModel` with `model`'s configuration, weights, device and mode (needs `transformers`)."
    from transformers import GPT2Config, GPT2LMHeadModel
    d = config_to_hf(model.cfg)
    for k in ("architectures", "model_type"): d.pop(k)
    ref = GPT2LMHeadModel(GPT2Config(**d))
    missing, unexpected = ref.load_state_dict(hf_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_weights)]
    if missing or unexpected: raise RuntimeError(f"weights did not fit: missing {missing}, unexpected {unexpected}")
    p = next(model.parameters())
    return ref.to(device=p.device, dtype=p.dtype).train(model.training)


def _anchor_module(kv_cache: bool):
    try:
        if kv_cache: from llms_from_scratch.kv_cache import gpt2 as mod
        else: from llms_from_scratch import ch04 as mod
    except ImportError as e:
        raise ImportError("the anchor baseline needs the `llms-from-scratch` package: "
                          "pip install --no-deps llms-from-scratch (its declared dependencies pull in TensorFlow, "
                          "which it does not need for the GPT model; `make bench` installs it this way)") from e
    return mod

def anchor_config(cfg: GPTConfig) -> dict:
    "The configuration dict of the book's reference `GPTModel` for `cfg`."
    if cfg.ln_eps != 1e-5: raise ValueError(f"the reference model's LayerNorm has eps=1e-5, cfg has {cfg.ln_eps}")
    return dict(vocab_size=cfg.vocab_size, context_length=cfg.context_length, emb_dim=cfg.emb_dim,
                n_heads=cfg.n_heads, n_layers=cfg.n_layers, drop_rate=cfg.drop_rate, qkv_bias=cfg.qkv_bias)

def anchor_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    "`model`'s weights under the names of `llms_from_scratch`'s GPTModel (the QKV matrix cut in three)."
    sd, d = model.state_dict(), model.cfg.emb_dim
    out = {"tok_emb.weight": sd["tok_emb.weight"], "pos_emb.weight": sd["pos_emb.weight"],
           "final_norm.scale": sd["final_norm.weight"], "final_norm.shift": sd["final_norm.bias"],
           "out_head.weight": sd["out_head.weight"].clone()}  # a matrix of its own, even when ours is tied
    for i in range(model.cfg.n_layers):
        p, q = f"blocks.{i}.", f"trf_blocks.{i}."
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[q + f"att.{name}.weight"] = sd[p + "att.qkv.weight"][j * d:(j + 1) * d]
            if model.cfg.qkv_bias: out[q + f"att.{name}.bias"] = sd[p + "att.qkv.bias"][j * d:(j + 1) * d]
        pairs = {"att.out_proj": "att.proj", "ff.layers.0": "ff.fc", "ff.layers.2": "ff.proj"}
        for theirs, ours in pairs.items():
            for t in ("weight", "bias"): out[q + f"{theirs}.{t}"] = sd[p + f"{ours}.{t}"]
        for theirs, ours in (("norm1", "ln1"), ("norm2", "ln2")):
            out[q + f"{theirs}.scale"], out[q + f"{theirs}.shift"] = sd[p + f"{ours}.weight"], sd[p + f"{ours}.bias"]
    return {k: v.detach().clone() for k, v in out.items()}

def _anchor_kv_attention(self, x, use_cache=False, start_pos=0, cache=None):
    "`llms_from_scratch.kv_cache.gpt2.MultiHeadAttention.forward` (Apache-2.0, S. Raschka), its causal mask fixed."
    b, num_tokens, d_in = x.shape
    keys = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
    values = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
    queries = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
    if use_cache:
        if cache is not None:
            keys = torch.cat([cache[0], keys], dim=2)
            values = torch.cat([cache[1], values], dim=2)
        next_cache = (keys, values)
    else: next_cache = None
    seq_len = keys.size(2)
    causal_mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=x.device), diagonal=1)
    causal_mask = causal_mask[-num_tokens:, :][None, None, :, :]  # 1.0.19 has [:, -num_tokens:], wrong for 1 new token
    attn_scores = queries @ keys.transpose(2, 3)
    attn_scores.masked_fill_(causal_mask, -torch.inf)
    attn_weights = self.dropout(torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1))
    context_vec = (attn_weights @ values).transpose(1, 2).contiguous().view(b, num_tokens, self.d_out)
    return self.out_proj(context_vec), next_cache

def to_anchor(model: GPTModel, kv_cache: bool = False) -> nn.Module:
    "The book's reference `llms_from_scratch.ch04.GPTModel` (or `kv_cache.gpt2`'s) with `model`'s weights."
    ref = _anchor_module(kv_cache).GPTModel(anchor_config(model.cfg))
    if kv_cache:
        for blk in ref.trf_blocks: blk.att.forward = types.MethodType(_anchor_kv_attention, blk.att)
    sd, ours = ref.state_dict(), anchor_state_dict(model)
    if set(ours) - set(sd): raise RuntimeError(f"not in the reference model: {sorted(set(ours) - set(sd))}")
    ref.load_state_dict({**sd, **ours})  # its own causal-mask buffers, our weights
    p = next(model.parameters())
    return ref.to(device=p.device, dtype=p.dtype).train(model.training)


@torch.no_grad()
def anchor_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    "Greedy decoding with the KV cache of `llms_from_scratch.kv_cache.gpt2.GPTModel`."
    cache = _anchor_module(kv_cache=True).KVCache(n_layers=len(model.trf_blocks))
    model.eval(); model.current_pos = 0  # the anchor keeps its position counter on the model
    logits = model(idx, use_cache=True, cache=cache)
    for i in range(max_new_tokens):
        nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
        idx = torch.cat([idx, nxt], dim=1)
        if i < max_new_tokens - 1: logits = model(nxt, use_cache=True, cache=cache)
    return idx

@torch.no_grad()
def hf_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    "Greedy decoding with Hugging Face's `generate` and its KV cache, never stopping early."
    model.eval()
    model.generation_config.eos_token_id = None  # exactly max_new_tokens tokens, like the others
    model.generation_config.pad_token_id = 0
    return model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                          do_sample=False, use_cache=True)


def load_results(path: str | os.PathLike | None = None) -> dict:
    "The benchmark results of `bench/run.py` (`bench/results/latest.json` of this checkout by default)."
    if path is None:
        here = Path.cwd().resolve()
        found = [d / "bench" / "results" / "latest.json" for d in (here, *here.parents)]
        path = next((p for p in found if p.is_file()), None)
        if path is None:
            raise FileNotFoundError("no bench/results/latest.json above the working directory: "
                                    "run `make bench` (or python bench/run.py) in the repository first")
    return json.loads(Path(path).read_text())


def _version(pkg: str) -> str | None:
    import importlib.metadata as md
    try: return md.version(pkg)
    except md.PackageNotFoundError: return None

def machine_info(device: str | torch.device = "cpu") -> dict:
    "Date, machine, threads and library versions, for the header of a benchmark."
    device = torch.device(device)
    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((l.split(":", 1)[1].strip() for l in info if l.startswith("model name")), cpu)
        flags = set(next((l.split(":", 1)[1].split() for l in info if l.startswith("flags")), []))
    except OSError: pass
    machine = f"{cpu}, {os.cpu_count()} CPUs"
    if device.type == "cuda": machine += f", {torch.cuda.get_device_name(device)}"
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "threads": torch.get_num_threads(),
            "cpu_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": _version("transformers"),
            "llms_from_scratch": _version("llms-from-scratch")}


def _fmt(v, spec="{:,.0f}"):
    return "-" if v is None else spec.format(v)

def _per_impl(impls: dict, key: str) -> dict:
    "`key` of each implementation's results (ours, anchor, HF), None for one that was not run."
    return {k: impls[k][key] if k in impls else None for k in ("ours", "anchor", "hf")}

def train_table(res: dict) -> str:
    "The training results as a text table: tokens/s and MFU per implementation, and our speed-ups."
    lines = [f"{'model':8} {'prec':5} {'batch':>8} {'ours tok/s':>11} {'anchor':>9} {'HF':>9} "
             f"{'x anchor':>9} {'x HF':>6} {'MFU ours':>9} {'anchor':>7} {'HF':>6}"]
    for r in res["train"]:
        i = r["impls"]
        tps, mf = _per_impl(i, "tokens_per_s"), _per_impl(i, "mfu")
        ra = r["ratios"]
        name = r["model"] + ("*" if r.get("compiled") else "")  # * torch.compile'd
        lines.append(f"{name:8} {r['precision']:5} {r['batch']:>3}x{r['tokens']:<4}{_fmt(tps['ours']):>11} "
                     f"{_fmt(tps['anchor']):>9} {_fmt(tps['hf']):>9} {_fmt(ra.get('anchor'), '{:.2f}x'):>9} "
                     f"{_fmt(ra.get('hf'), '{:.2f}x'):>6} {_fmt(mf['ours'], '{:.0%}'):>9} "
                     f"{_fmt(mf['anchor'], '{:.0%}'):>7} {_fmt(mf['hf'], '{:.0%}'):>6}")
    return "\n".join(lines)

def generate_table(res: dict) -> str:
    "The generation results as a text table: tokens/s per implementation and our speed-ups."
    lines = [f"{'model':8} {'prec':5} {'ours tok/s':>11} {'anchor':>9} {'HF':>9} {'x anchor':>9} {'x HF':>6} "
             f"{'same tokens':>12} {'bound':>7}"]
    for r in res["generate"]:
        i, ra = r["impls"], r["ratios"]
        tps = _per_impl(i, "tokens_per_s")
        same = "/".join(f"{i[k]['agree']:.0%}" for k in ("anchor", "hf") if k in i)
        lines.append(f"{r['model']:8} {r['precision']:5} {_fmt(tps['ours'], '{:,.1f}'):>11} "
                     f"{_fmt(tps['anchor'], '{:,.1f}'):>9} {_fmt(tps['hf'], '{:,.1f}'):>9} "
                     f"{_fmt(ra.get('anchor'), '{:.2f}x'):>9} {_fmt(ra.get('hf'), '{:.2f}x'):>6} {same:>12} "
                     f"{_fmt(r.get('bound_tokens_per_s'), '{:,.0f}'):>7}")
    return "\n".join(lines)

def lever_table(res: dict) -> str:
    "What each optimisation buys our model: tokens/s without and with it."
    lines = [f"{'optimisation':34} {'model':6} {'prec':5} {'without':>9} {'with':>9} {'gain':>6}"]
    for r in res["levers"]:
        lines.append(f"{r['lever']:34} {r['model']:6} {r['precision']:5} {_fmt(r['without']):>9} "
                     f"{_fmt(r['with']):>9} {_fmt(r['gain'], '{:.2f}x'):>6}")
    return "\n".join(lines)

def target_table(res: dict) -> str:
    "The issue's targets, the measured value of each, and whether it is met."
    lines = [f"{'target':52} {'wanted':>8} {'measured':>9}  met"]
    for t in res["targets"]:
        v = t["value"]
        val = "-" if v is None else (f"{v:.{1 if v >= 0.1 else 3}%}" if t["unit"] == "%" else f"{v:.2f}x")
        want = f"{t['op']}{t['want']:.0%}" if t["unit"] == "%" else f"{t['op']}{t['want']:.1f}x"
        met = "n/a" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"{t['name']:52} {want:>8} {val:>9}  {met}")
    return "\n".join(lines)


def plot_sizes(res: dict, precision: str = "bf16", ax=None):
    "Training tokens/s against parameters for each implementation (log-log), at `precision`."
    if ax is None:
        import matplotlib.pyplot as plt
        _, ax = plt.subplots(figsize=(6, 3.4))
    names = {"ours": "ours", "anchor": "llms_from_scratch ch04", "hf": "HF GPT2LMHeadModel"}
    for k, label in names.items():
        pts = sorted((r["params"], r["impls"][k]["tokens_per_s"]) for r in res["train"]
                     if r["precision"] == precision and k in r["impls"])
        if pts: ax.plot(*zip(*pts), "o-", label=label)
    ax.set_xscale("log"); ax.set_yscale("log")
    ax.set_xlabel("parameters (ours; tied head counted once)"); ax.set_ylabel("training tokens/s")
    ax.set_title(f"Training speed, {precision}, {res['meta']['threads']} CPU threads")
    ax.legend(); ax.grid(alpha=0.3, which="both")
    ax.figure.tight_layout()
    return ax
