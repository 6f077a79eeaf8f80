"""The book's conceptual figures, drawn with matplotlib from the objects the chapters build.

Not part of the `llm_scratch` package: this is the book's drawing kit, like `_book/_ext`. Each chapter
calls one of these functions in a cell marked `#| echo: false`, passing what it just computed (token ids,
a dataset's windows, a model, a collated batch), so a figure shows what the code does rather than what
someone once drew. Every function returns the matplotlib figure; the notebooks' asserts check the
numbers the figure is drawn from.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

# One palette for every figure: a role keeps its colour from chapter to chapter.
C = dict(token="#dbe9f6", id="#fde2c4", vec="#4c72b0", query="#e377c2", key="#2ca02c", value="#ff7f0e",
         score="#9467bd", frozen="#d9d9d9", train="#c6e6c3", pad="#f2f2f2", masked="#bdbdbd",
         prompt="#dbe9f6", response="#fde2c4", eot="#f4b6b6", norm="#fff2b3", attn="#cfe2f3",
         ff="#d9ead3", emb="#ead1dc", head="#f9cb9c", dev0="#dbe9f6", dev1="#fde2c4", edge="#444444")


def canvas(w: float, h: float, scale: float = 0.55):
    "A blank figure with data coordinates 0..w by 0..h (one unit = `scale` inches), no axes."
    fig, ax = plt.subplots(figsize=(w * scale, h * scale), dpi=110)
    ax.set_xlim(0, w); ax.set_ylim(0, h); ax.set_aspect("equal"); ax.axis("off")
    fig.subplots_adjust(0, 0, 1, 1)
    return fig, ax


def box(ax, x, y, w, h, text="", color="white", fontsize=9, round=True, **kw):
    "A (rounded) box with its lower left corner at (x, y) and `text` in the middle."
    style = "round,pad=0,rounding_size=0.12" if round else "square,pad=0"
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=style, facecolor=color, edgecolor=kw.pop("edge", C["edge"]),
                                linewidth=kw.pop("lw", 0.8), hatch=kw.pop("hatch", None)))
    if text: ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, **kw)


def arrow(ax, x0, y0, x1, y1, text="", fontsize=8, color=C["edge"], side="right", **kw):
    "An arrow from (x0, y0) to (x1, y1), with an optional label beside its middle."
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=9, color=color,
                                 linewidth=0.9, shrinkA=1, shrinkB=1, **kw))
    if text:
        dx = 0.15 if side == "right" else -0.15
        ax.text((x0 + x1) / 2 + dx, (y0 + y1) / 2, text, fontsize=fontsize, color=color,
                ha="left" if side == "right" else "right", va="center")


def cells(ax, x, y, values, colors, w=1.0, h=0.8, fontsize=8, hatch=None):
    "A row of square cells from (x, y) rightwards, one per value, each with its own colour."
    for i, (v, c) in enumerate(zip(values, colors)):
        box(ax, x + i * w, y, w, h, str(v), c, fontsize=fontsize, round=False,
            hatch=hatch[i] if isinstance(hatch, (list, tuple)) else hatch)


def heat(ax, x, y, m, cell=0.35, cmap="RdBu", vmax=None, label="", fontsize=8):
    "A matrix as a heatmap of little squares, top row at the top, lower left corner at (x, y)."
    import numpy as np
    m = np.asarray(m, dtype=float)
    vmax = vmax or (abs(m).max() or 1.0)
    rows, cols = m.shape
    ax.imshow(m, cmap=cmap, vmin=-vmax if cmap == "RdBu" else 0, vmax=vmax,
              extent=(x, x + cols * cell, y, y + rows * cell), interpolation="nearest", zorder=2)
    ax.add_patch(Rectangle((x, y), cols * cell, rows * cell, fill=False, edgecolor=C["edge"], linewidth=0.8, zorder=3))
    if label: ax.text(x + cols * cell / 2, y + rows * cell + 0.15, label, ha="center", va="bottom", fontsize=fontsize)
    return x + cols * cell, y + rows * cell


def token_pipeline(text: str, pieces: list[str], ids: list[int], vectors, emb_dim: int | None = None):
    "Text → tokens → token ids → embedding vectors (the first few of `emb_dim` numbers): one column per token."
    n, d = len(ids), vectors.shape[1]
    w = 2.4
    fig, ax = canvas(n * w + 2.6, 8.2)
    ax.text(0.1, 7.7, "text", fontsize=9, style="italic"); ax.text(2.6, 7.7, repr(text), fontsize=10, va="baseline")
    rows = [(6.0, "tokens", [repr(p) for p in pieces], C["token"]), (4.1, "token ids", ids, C["id"])]
    for y, name, vals, col in rows:
        ax.text(0.1, y + 0.35, name, fontsize=9, style="italic")
        for i, v in enumerate(vals): box(ax, 2.6 + i * w, y, w - 0.4, 0.8, str(v), col, fontsize=9)
    ax.text(0.1, 1.6, f"vectors\n(first {d} of\n{emb_dim or d} numbers)", fontsize=9, style="italic", va="center")
    vectors = vectors.detach(); vmax = float(abs(vectors).max())
    for i in range(n):
        cx = 2.6 + i * w + (w - 0.4) / 2
        arrow(ax, cx, 7.5, cx, 6.85); arrow(ax, cx, 5.95, cx, 4.95)
        arrow(ax, cx, 4.05, cx, 3.25, "embedding\nlookup\n(+ position)" if i == n - 1 else "", fontsize=7)
        cell = min(0.3, 3.0 / d)
        heat(ax, cx - cell / 2, 3.15 - d * cell, vectors[i:i + 1].T.detach(), cell=cell, vmax=vmax)
    return fig


def sliding_windows(labels: list[str], windows: list[tuple[int, list, list]], context_length: int, stride: int):
    "Which tokens each training example holds: inputs (blue) and next-token targets (orange), window by window."
    n = len(labels)
    fig, ax = canvas(n * 1.1 + 3.2, 2.0 + 1.9 * len(windows), scale=0.5)
    top = 1.2 + 1.9 * len(windows)
    ax.text(0.1, top + 0.3, "token stream", fontsize=9, style="italic")
    cells(ax, 3.0, top, labels, [C["token"]] * n, w=1.1, fontsize=7)
    for r, (start, x, y) in enumerate(windows):
        yy = top - 1.9 * (r + 1)
        ax.text(0.1, yy + 0.9, f"window {r}\n(starts at {start})", fontsize=8, va="center")
        cells(ax, 3.0 + start * 1.1, yy + 0.9, x, [C["prompt"]] * len(x), w=1.1, fontsize=7)
        cells(ax, 3.0 + (start + 1) * 1.1, yy, y, [C["response"]] * len(y), w=1.1, fontsize=7)
        if r == 0:
            ax.text(3.0 + (start + len(x)) * 1.1 + 0.2, yy + 1.3, "input", fontsize=8, color="#1f4e79", va="center")
            ax.text(3.0 + (start + len(y) + 1) * 1.1 + 0.2, yy + 0.4, "target = input shifted by one", fontsize=8,
                    color="#a0522d", va="center")
    ax.text(3.0, 0.1, f"context_length = {context_length}, stride = {stride}: each window starts {stride} "
            f"token{'s' if stride > 1 else ''} after the previous one", fontsize=9)
    return fig


def attention_flow(words: list[str], x, q, k, v, weights, context):
    "Self-attention on real numbers: x → queries, keys, values → scores → weights → context vectors."
    import numpy as np
    T, d_in = x.shape; d = q.shape[1]; c = 0.42; gap = 1.1
    fig, ax = canvas(9.9 + (d_in + 2 * d + 2 * T) * c, 3 * T * c + 2 * gap + 2.2, scale=0.5)
    yv = 1.0; yk = yv + T * c + gap; yq = yk + T * c + gap; mid = yk + T * c / 2
    for i, wd in enumerate(words): ax.text(1.55, yk + (T - i - 0.5) * c, repr(wd), ha="right", va="center", fontsize=7)
    heat(ax, 1.7, yk, x, c, label="x  (tokens × d_in)")
    xs = 1.7 + d_in * c + 1.8
    for name, m, col, yy in [("Q = x W_q", q, C["query"], yq), ("K = x W_k", k, C["key"], yk), ("V = x W_v", v, C["value"], yv)]:
        arrow(ax, 1.7 + d_in * c + 0.1, mid, xs - 0.1, yy + T * c / 2, color=col)
        heat(ax, xs, yy, m, c, label=name)
    sx = xs + d * c + 2.2
    arrow(ax, xs + d * c + 0.1, yq + T * c / 2, sx - 0.1, mid + 0.2, color=C["score"])
    arrow(ax, xs + d * c + 0.1, mid, sx - 0.1, mid, color=C["score"])
    scores = (np.asarray(q) @ np.asarray(k).T) / np.sqrt(d)
    future = np.triu(np.ones((T, T)), 1) > 0
    heat(ax, sx, yk, np.where(future, 0.0, scores), c, label="Q Kᵀ / √d, future masked")
    for i, j in zip(*np.nonzero(future)): ax.text(sx + (j + 0.5) * c, yk + (T - i - 0.5) * c, "×", ha="center", va="center", fontsize=6, zorder=4)
    wx = sx + T * c + 2.0
    arrow(ax, sx + T * c + 0.1, mid, wx - 0.1, mid)
    ax.text((sx + T * c + wx) / 2, mid + 0.2, "softmax\nper row", ha="center", va="bottom", fontsize=7)
    heat(ax, wx, yk, weights, c, cmap="Blues", vmax=1.0, label="weights (rows sum to 1)")
    cx = wx + T * c + 2.0
    arrow(ax, wx + T * c + 0.1, mid, cx - 0.1, mid)
    arrow(ax, xs + d * c + 0.1, yv + T * c / 2, cx + d * c / 2, yk - 0.1, color=C["value"])
    ax.text(cx - 0.2, yk - 0.45, "weights × V", ha="right", fontsize=7, color=C["value"])
    heat(ax, cx, yk, context, c, label="context vectors")
    ax.text(sx, yv + 0.3, f"{T} tokens, d_in = {d_in}, d = {d}:\neach output row is a weighted average of the rows of V", fontsize=8)
    return fig


def split_heads(T: int, d_out: int, n_heads: int):
    "How one fused projection (tokens × 3·d_out) becomes queries, keys and values for each head."
    hd = d_out // n_heads; c = 0.36
    role = [("queries", C["query"]), ("keys", C["key"]), ("values", C["value"])]
    W = 3 * d_out * c
    fig, ax = canvas(W + 9.0 + n_heads * (hd * c + 0.7), 3 * (T * c + 0.8) + 1.6, scale=0.5)
    H = 3 * (T * c + 0.8) + 1.6
    y0 = H / 2 - T * c / 2
    for j in range(3 * d_out):
        r, h = divmod(j, d_out)
        ax.add_patch(Rectangle((0.4 + j * c, y0), c, T * c, facecolor=role[r][1], alpha=0.35 + 0.55 * (h // hd) / max(n_heads - 1, 1),
                               edgecolor="white", linewidth=0.6))
    for r in range(3):
        ax.text(0.4 + (r + 0.5) * d_out * c, y0 + T * c + 0.15, role[r][0], ha="center", fontsize=7.5)
    ax.text(0.4 + W / 2, y0 - 0.55, f"qkv(x): (b, {T}, 3 × {d_out}), one matrix product", ha="center", fontsize=7.5)
    x1 = 0.4 + W + 0.4
    arrow(ax, x1, y0 + T * c / 2, x1 + 4.6, y0 + T * c / 2)
    ax.text(x1 + 2.3, y0 + T * c / 2 + 0.2, f".view(b, {T}, 3, {n_heads}, {hd})\n.permute(2, 0, 3, 1, 4)", ha="center",
            va="bottom", fontsize=7)
    x2 = x1 + 5.2
    for r in range(3):
        yy = H - 0.9 - (r + 1) * (T * c + 0.8) + 0.6
        for h in range(n_heads):
            xx = x2 + h * (hd * c + 0.7)
            ax.add_patch(Rectangle((xx, yy), hd * c, T * c, facecolor=role[r][1], alpha=0.35 + 0.55 * h / max(n_heads - 1, 1),
                                   edgecolor=C["edge"], linewidth=0.6))
            if r == 0: ax.text(xx + hd * c / 2, yy + T * c + 0.15, f"head {h}", ha="center", fontsize=7.5)
        ax.text(x2 + n_heads * (hd * c + 0.7), yy + T * c / 2, f"{role[r][0]}\n(b, {n_heads}, {T}, {hd})", fontsize=7,
                va="center")
    return fig


def gpt_stack(model, title: str = ""):
    "The GPT from the token ids at the bottom to the logits at the top, with each part's parameter count."
    cfg = model.cfg
    n = lambda m: sum(p.numel() for p in m.parameters())
    blk = model.blocks[0] if len(model.blocks) else None
    steps = [(0.7, "layer norm", C["norm"]), (1.0, f"masked multi-head attention  ({cfg.n_heads} heads)", C["attn"]),
             (0.6, "dropout, then add the shortcut", "white"), (0.7, "layer norm", C["norm"]),
             (1.0, f"feed-forward  {cfg.emb_dim} → {4 * cfg.emb_dim} → {cfg.emb_dim}, GELU", C["ff"]),
             (0.6, "dropout, then add the shortcut", "white")]
    counts = [n(blk.ln1), n(blk.att), None, n(blk.ln2), n(blk.ff), None] if blk is not None else [None] * 6
    block_h = sum(h for h, _, _ in steps) + 0.5 * (len(steps) - 1)
    H = block_h + 8.6 + (0.6 if title else 0)
    fig, ax = canvas(12.5, H, scale=0.42)
    X, W = 1.0, 7.0
    def part(y, h, text, col, count=None):
        box(ax, X, y, W, h, text, col, fontsize=8)
        if count is not None: ax.text(X + W + 0.6, y + h / 2, count if isinstance(count, str) else f"{count:,}",
                                      fontsize=7, va="center", color="#555555")
    ax.text(X + W / 2, 0.1, f"token ids  (batch, tokens ≤ {cfg.context_length})", ha="center", fontsize=8)
    arrow(ax, X + W / 2, 0.45, X + W / 2, 0.9)
    part(0.9, 0.8, f"token embedding  {cfg.vocab_size:,} × {cfg.emb_dim}", C["emb"], n(model.tok_emb))
    part(1.9, 0.8, f"+ position embedding  {cfg.context_length} × {cfg.emb_dim}", C["emb"], n(model.pos_emb))
    y = 3.6
    arrow(ax, X + W / 2, 2.7, X + W / 2, y)
    ax.add_patch(FancyBboxPatch((X - 0.6, y - 0.3), W + 0.9, block_h + 0.6, boxstyle="round,pad=0,rounding_size=0.2",
                                facecolor="none", edgecolor="#888888", linestyle="--"))
    ax.text(X - 0.5, y + block_h + 0.4, f"transformer block, repeated {cfg.n_layers} times", fontsize=8, color="#555555")
    for i, ((h, text, col), cnt) in enumerate(zip(steps, counts)):
        part(y, h, text, col, cnt)
        if i < len(steps) - 1: arrow(ax, X + W / 2, y + h, X + W / 2, y + h + 0.5)
        if i in (0, 3): start = y - 0.25
        if i in (2, 5):  # the shortcut: from below the layer norm, around the branch, into the add
            ax.plot([X + W / 2, X - 0.35, X - 0.35], [start, start, y + h / 2], color="#888888", linewidth=0.8)
            arrow(ax, X - 0.35, y + h / 2, X, y + h / 2, color="#888888")
        y += h + 0.5
    y += 0.5
    arrow(ax, X + W / 2, y - 1.0, X + W / 2, y)
    part(y, 0.7, "final layer norm", C["norm"], n(model.final_norm)); y += 1.2
    arrow(ax, X + W / 2, y - 0.5, X + W / 2, y)
    tied = model.out_head.weight is model.tok_emb.weight
    part(y, 0.8, f"output head  {cfg.emb_dim} → {cfg.vocab_size:,}", C["head"],
         "the token embedding,\nshared (tied)" if tied else n(model.out_head))
    arrow(ax, X + W / 2, y + 0.8, X + W / 2, y + 1.2)
    ax.text(X + W / 2, y + 1.3, f"logits  (batch, tokens, {cfg.vocab_size:,}): a score for every next token",
            ha="center", va="bottom", fontsize=8)
    ax.text(X + W + 0.6, y + 2.0, f"parameters\n(total {n(model):,})", fontsize=7, color="#555555", va="bottom")
    if title: ax.text(X + W / 2, y + 2.2, title, ha="center", fontsize=9, weight="bold")
    return fig


def kv_cache(prompt: list[str], new: list[str], shapes: list[tuple[int, int]]):
    "The cache over a few decoding steps: one new row of keys and values per step, one query per step."
    steps = len(shapes); T = shapes[-1][1]; c = 0.5
    fig, ax = canvas(steps * (T * c + 4.2) + 0.5, T * c + 4.2, scale=0.5)
    toks = prompt + new
    for s, (n_q, n_k) in enumerate(shapes):
        x0 = 0.6 + s * (T * c + 4.2)
        y0 = 1.4
        title = f"prefill: {n_q} queries" if s == 0 else f"step {s}: 1 query"
        ax.text(x0 + 1.6, y0 + T * c + 1.6, title, fontsize=8, weight="bold")
        for i in range(n_k):  # one row per cached position (top = oldest)
            fresh = i >= n_k - n_q
            yy = y0 + (T - 1 - i) * c
            box(ax, x0, yy, 2 * c, c, "", C["key"] if fresh else C["frozen"], round=False)
            box(ax, x0 + 2 * c + 0.15, yy, 2 * c, c, "", C["value"] if fresh else C["frozen"], round=False)
            ax.text(x0 - 0.1, yy + c / 2, repr(toks[i]), ha="right", va="center", fontsize=6)
            if fresh: box(ax, x0 + 4 * c + 0.9, yy, 2 * c, c, "", C["query"], round=False)
        ax.text(x0 + c, y0 + T * c + 0.2, "K", ha="center", fontsize=8)
        ax.text(x0 + 3 * c + 0.15, y0 + T * c + 0.2, "V", ha="center", fontsize=8)
        ax.text(x0 + 5 * c + 0.9, y0 + T * c + 0.2, "Q", ha="center", fontsize=8)
        ax.text(x0 + 1.5, y0 - 0.6, f"cache: {n_k} rows", fontsize=7, ha="center")
    ax.text(0.2, 0.2, "grey: read from the cache; coloured: computed in this step", fontsize=8)
    return fig


def parallel_layouts(n_layers: int = 4):
    "What two devices hold and compute under data, fully sharded, tensor and pipeline parallelism."
    fig, axs = plt.subplots(1, 4, figsize=(12, 3.9), dpi=110)
    titles = ["DDP: whole model on each,\nhalf the batch each", "FSDP / ZeRO-3: each holds half\nof every layer, gathers it to use it",
              "tensor: each holds and computes\nhalf of every layer, same batch", "pipeline: each holds whole layers,\nmicro-batches flow through"]
    for k, (ax, title) in enumerate(zip(axs, titles)):
        ax.set_xlim(0, 10); ax.set_ylim(0, 11); ax.axis("off"); ax.set_title(title, fontsize=8.5)
        for d in range(2):
            x0 = 0.3 + d * 5; col = C["dev0"] if d == 0 else C["dev1"]
            box(ax, x0, 0.3, 4.4, 10.2, "", "white", edge="#999999")
            ax.text(x0 + 2.2, 0.6, f"device {d}", ha="center", fontsize=8)
            for l in range(n_layers):
                y = 1.4 + l * 2.1
                if k == 0: box(ax, x0 + 0.4, y, 3.6, 1.5, f"layer {l}", col, fontsize=7)
                elif k == 1:
                    box(ax, x0 + 0.4, y, 3.6, 1.5, "", "white", edge="#bbbbbb")
                    box(ax, x0 + 0.4 + d * 1.8, y, 1.8, 1.5, f"{l}: half {d}", col, fontsize=6.5, round=False)
                elif k == 2:
                    box(ax, x0 + 0.4, y, 3.6, 1.5, "", "white", edge="#bbbbbb")
                    box(ax, x0 + 0.4, y + d * 0.75, 3.6, 0.75, f"{l}: heads/cols {d}", col, fontsize=6.5, round=False)
                else:
                    if (l < n_layers // 2) == (d == 0): box(ax, x0 + 0.4, y, 3.6, 1.5, f"layer {l}", col, fontsize=7)
        if k == 3:
            arrow(ax, 4.65, 1.4 + (n_layers // 2 - 1) * 2.1 + 0.75, 5.35, 1.4 + (n_layers // 2) * 2.1 + 0.75)
    fig.text(0.5, 0.01, "Activations travel: DDP all-reduces gradients; FSDP all-gathers weights and reduce-scatters "
             "gradients; tensor parallelism all-reduces inside each layer; pipeline sends activations between stages.",
             ha="center", fontsize=7.5)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.86, bottom=0.07, wspace=0.05)
    return fig


def padded_batch(rows: list[list[str]], kinds: list[list[str]], title_in: str, targets=None, target_kinds=None,
                 legend: dict | None = None, pointer: list[int] | None = None):
    "A padded batch as a grid of cells coloured by kind (prompt, response, end of text, padding, ignored)."
    colors = dict(prompt=C["prompt"], response=C["response"], eot=C["eot"], pad=C["pad"], ignored=C["masked"],
                  text=C["token"], last=C["head"])
    L = max(len(r) for r in rows); B = len(rows); w, h = 1.25, 0.75
    panels = [(title_in, rows, kinds)] + ([("targets", targets, target_kinds)] if targets is not None else [])
    legend_w = sum(0.95 + 0.16 * len(t) for t in (legend or {}).values()) + 0.6
    fig, ax = canvas(max(len(panels) * (L * w + 1.2) + 0.6, legend_w), B * (h + 0.15) + 2.6, scale=0.5)
    for p, (title, rs, ks) in enumerate(panels):
        x0 = 0.6 + p * (L * w + 1.2)
        ax.text(x0, B * (h + 0.15) + 1.5, title, fontsize=9, weight="bold")
        for b, (r, k) in enumerate(zip(rs, ks)):
            y = 1.2 + (B - 1 - b) * (h + 0.15)
            cells(ax, x0, y, r, [colors[kk] for kk in k], w=w, h=h, fontsize=6,
                  hatch=["///" if kk == "ignored" else None for kk in k])
            if pointer is not None and p == 0:
                j = pointer[b]
                ax.add_patch(Rectangle((x0 + j * w, y), w, h, fill=False, edgecolor="#c00000", linewidth=2, zorder=5))
                if j != L - 1:
                    ax.add_patch(Rectangle((x0 + (L - 1) * w, y), w, h, fill=False, edgecolor="#555555", linewidth=1.5,
                                           linestyle=(0, (2, 1.5)), zorder=5))
    x = 0.6
    for kind, text in (legend or {}).items():
        if kind in ("read", "naive"):
            ax.add_patch(Rectangle((x, 0.2), 0.6, 0.5, fill=False, edgecolor="#c00000" if kind == "read" else "#555555",
                                   linewidth=2 if kind == "read" else 1.5, linestyle="-" if kind == "read" else (0, (2, 1.5))))
        else: box(ax, x, 0.2, 0.6, 0.5, "", colors[kind], round=False, hatch="///" if kind == "ignored" else None)
        ax.text(x + 0.75, 0.45, text, fontsize=7, va="center"); x += 0.95 + 0.16 * len(text)
    return fig


def lora(layer):
    "A `LoRALinear`'s A and B beside its frozen W: y = x Wᵀ + b + (α/r) x A B, drawn with widths to scale."
    from matplotlib.patches import Circle, Polygon
    d_in, r = layer.A.shape; d_out = layer.B.shape[1]; alpha = layer.alpha
    trained = layer.A.numel() + layer.B.numel(); frozen = sum(p.numel() for p in layer.base.parameters())
    s = 4.0 / max(d_in, d_out); neck = max(r * s, 0.12)
    fig, ax = canvas(14.6, 10.2, scale=0.5)
    box(ax, 1.5, 0.3, 10, 0.8, f"x   (…, {d_in})", C["token"], fontsize=9)
    # the frozen path
    wx, wy = 1.5 + (4 - d_in * s) / 2, 2.4
    box(ax, 1.5, wy, 4.0, 4.0, f"W  {d_out} × {d_in}\nfrozen\n({frozen:,} numbers\nwith its bias)", C["frozen"],
        fontsize=8.5, round=False)
    arrow(ax, 3.5, 1.1, 3.5, wy)
    # the trained path: A narrows d_in to r, B widens r to d_out
    cx = 9.5
    ax.add_patch(Polygon([(cx - d_in * s / 2, wy), (cx + d_in * s / 2, wy), (cx + neck / 2, wy + 1.8), (cx - neck / 2, wy + 1.8)],
                         facecolor=C["train"], edgecolor=C["edge"], linewidth=0.8))
    ax.add_patch(Polygon([(cx - neck / 2, wy + 2.2), (cx + neck / 2, wy + 2.2), (cx + d_out * s / 2, wy + 4.0), (cx - d_out * s / 2, wy + 4.0)],
                         facecolor=C["train"], edgecolor=C["edge"], linewidth=0.8))
    ax.text(cx + 2.2, wy + 0.8, f"A  {d_in} × {r}\nrandom start", fontsize=8, va="center")
    ax.text(cx + 2.2, wy + 3.2, f"B  {r} × {d_out}\nstarts at 0", fontsize=8, va="center")
    ax.text(cx - 2.3, wy + 2.0, f"rank {r}", fontsize=8, ha="right", va="center")
    arrow(ax, cx, wy + 1.8, cx, wy + 2.2)
    arrow(ax, cx, 1.1, cx, wy)
    ax.text(cx, wy + 4.5, f"× α/r = {alpha / r:g}", ha="center", fontsize=8)
    # the sum
    px, py = 6.5, 8.3
    ax.add_patch(Circle((px, py), 0.35, facecolor="white", edgecolor=C["edge"], linewidth=0.8))
    ax.text(px, py, "+", ha="center", va="center", fontsize=11)
    arrow(ax, 3.5, wy + 4.0, px - 0.3, py - 0.2)
    arrow(ax, cx, wy + 4.9, px + 0.3, py - 0.2)
    arrow(ax, px, py + 0.35, px, py + 0.9)
    ax.text(px, py + 1.0, f"y   (…, {d_out})", ha="center", va="bottom", fontsize=9)
    ax.text(cx + 2.2, wy + 2.0, f"trained:\n{trained:,} numbers", fontsize=8, va="center", color="#2e7d32")
    return fig


def why_attention(src: list[str], tgt: str, weights):
    "An RNN squeezes the sentence through one state vector; attention lets each output look at every input."
    n = len(src)
    fig, axs = plt.subplots(1, 2, figsize=(11, 3.3), dpi=110)
    for ax in axs: ax.set_xlim(0, n + 2.5); ax.set_ylim(0, 5); ax.axis("off")
    a, b = axs
    a.set_title("a recurrent network: everything passes through the last state", fontsize=8.5)
    for i, w in enumerate(src):
        a.text(i + 0.9, 0.4, repr(w), ha="center", fontsize=7)
        arrow(a, i + 0.9, 0.7, i + 0.9, 1.55)
        box(a, i + 0.6, 1.6, 0.6, 0.6, f"h{i + 1}", C["attn"], fontsize=6.5)
        if i: arrow(a, i - 0.1 + 0.2, 1.9, i + 0.6, 1.9)
    box(a, n + 0.9, 3.3, 1.3, 0.8, tgt, C["head"], fontsize=7)
    arrow(a, n + 0.2, 2.2, n + 1.3, 3.25, "one vector\nfor it all", fontsize=6.5)
    b.set_title(f"attention: the output {tgt!r} weighs every input", fontsize=8.5)
    box(b, n + 0.9, 3.3, 1.3, 0.8, tgt, C["head"], fontsize=7)
    for i, w in enumerate(src):
        b.text(i + 0.9, 0.4, repr(w), ha="center", fontsize=7)
        arrow(b, i + 0.9, 0.7, i + 0.9, 1.55)
        box(b, i + 0.6, 1.6, 0.6, 0.6, f"h{i + 1}", C["attn"], fontsize=6.5)
        wt = float(weights[i])
        b.add_patch(FancyArrowPatch((i + 0.9, 2.25), (n + 1.2, 3.25), arrowstyle="-|>", mutation_scale=7,
                                    color=plt.get_cmap("Blues")(0.3 + 0.7 * wt / float(max(weights))),
                                    linewidth=0.5 + 4 * wt))
        b.text(i + 0.9, 2.45, f"{wt:.2f}", ha="center", fontsize=6)
    fig.subplots_adjust(left=0.01, right=0.99, top=0.88, bottom=0.02, wspace=0.05)
    return fig
