"""Decoding: the KV cache gives exactly the uncached tokens; filters; eos; parity with HF generate."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from llm_scratch.generate import (KVCache, forward_with_cache, generate, sample_next,
                                  top_k_filter, top_p_filter)
from llm_scratch import hardware
from llm_scratch.hardware import decode_layout
from llm_scratch.model import GPTConfig, GPTModel


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=kw.pop("vocab_size", 97), context_length=kw.pop("context_length", 24),
                    emb_dim=kw.pop("emb_dim", 32), n_heads=kw.pop("n_heads", 4), n_layers=kw.pop("n_layers", 2),
                    drop_rate=kw.pop("drop_rate", 0.0), **kw)
    return GPTModel(cfg).eval()


@pytest.mark.parametrize("seed,kw", [(0, {}), (1, dict(qkv_bias=False)), (2, dict(tie_weights=False, n_layers=3)),
                                     (3, dict(emb_dim=48, n_heads=6))])
@pytest.mark.parametrize("prompt_len,new", [(1, 10), (5, 19), (12, 40), (24, 30), (30, 5)])
def test_kv_cache_gives_the_uncached_tokens(seed, kw, prompt_len, new):
    # context_length is 24: the longer cases slide the window (and a 30-token prompt starts past it)
    model = tiny(seed, **kw)
    prompt = torch.randint(0, model.cfg.vocab_size, (2, prompt_len), generator=torch.Generator().manual_seed(seed))
    a = generate(model, prompt, new, use_cache=False)
    b = generate(model, prompt, new, use_cache=True)
    assert torch.equal(a, b)
    assert a.shape == (2, prompt_len + new)


@pytest.mark.parametrize("seed,kw", [(0, {}), (2, dict(tie_weights=False, n_layers=3))])
def test_decode_layout_keeps_the_tokens_and_restores_the_parameters(seed, kw):
    model = tiny(seed, **kw)
    before = {n: (p, p.detach().clone()) for n, p in model.named_parameters()}
    prompt = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(seed))
    plain = generate(model, prompt, 30, use_cache=False)
    sampled = generate(model, prompt, 30, temperature=1.0, top_k=10, seed=5)
    with decode_layout(model):
        assert model.out_head.weight.stride() == (1, model.cfg.vocab_size)
        assert torch.equal(generate(model, prompt, 30, use_cache=True), plain)
        assert torch.equal(generate(model, prompt, 30, temperature=1.0, top_k=10, seed=5), sampled)
    for n, p in model.named_parameters():  # the same Parameter objects, values and usual layout again
        assert p is before[n][0] and p.is_contiguous() and torch.equal(p, before[n][1]), n
    with pytest.raises(RuntimeError, match="boom"):
        with decode_layout(model): raise RuntimeError("boom")
    assert all(p.is_contiguous() for p in model.parameters())  # restored after an error too
    half = tiny(seed, **kw).to(torch.bfloat16)
    with decode_layout(half): assert all(p.is_contiguous() for p in half.parameters())  # bf16: stored as it was


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_decoding_multiplies_one_row_with_mv_and_gives_the_same_step(seed):
    "Inside decode_layout(bf16_rows='mv') a bfloat16 model's linear layers use torch.mv for one row: a step's logits agree "
    "with the usual kernel to bfloat16 rounding, several rows take the usual kernel, and the modules are as before afterwards."
    half = tiny(seed).to(torch.bfloat16)
    prompt = torch.randint(0, half.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
    lins = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        step = torch.randint(0, half.cfg.vocab_size, (1, 1))
        want = half(step)
        with decode_layout(half, bf16_rows="mv"):
            assert all("forward" in vars(m) for m in lins)
            got = half(step)
            several = half(prompt)
        assert torch.equal(several, half(prompt))  # more than one row: the usual kernel, bit for bit
    assert all("forward" not in vars(m) for m in lins)
    torch.testing.assert_close(got.float(), want.float(), atol=0.05, rtol=0.02)  # bfloat16 sums in another order


def test_bf16_rows_auto_uses_mv_exactly_where_it_was_measured_faster(monkeypatch):
    half = tiny(0).to(torch.bfloat16)
    lins = [m for m in half.modules() if isinstance(m, torch.nn.Linear)]
    for choice in ("mv", "linear"):  # whatever this CPU measures, auto follows row_product
        monkeypatch.setattr(hardware, "_ROW_PRODUCTS", {(tuple(m.weight.shape), torch.bfloat16, "cpu"): choice for m in lins})
        with decode_layout(half): assert all(("forward" in vars(m)) == (choice == "mv") for m in lins), choice
    monkeypatch.setattr(hardware, "_ROW_PRODUCTS", {})
    assert hardware.row_product(lins[0].weight) in ("mv", "linear") and len(hardware._ROW_PRODUCTS) == 1  # measured once
    with decode_layout(half, bf16_rows="linear"): assert not any("forward" in vars(m) for m in lins)
    with pytest.raises(ValueError, match="bf16_rows must be"):
        with decode_layout(half, bf16_rows="fast"): pass


def test_cached_sampling_matches_uncached_with_the_same_seed():
    model = tiny(5)
    prompt = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(0))
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=10), dict(temperature=1.3, top_p=0.8)):
        assert torch.equal(generate(model, prompt, 30, use_cache=False, seed=11, **kw),
                           generate(model, prompt, 30, use_cache=True, seed=11, **kw))


def test_forward_with_cache_matches_forward_in_any_split():
    model = tiny(7, context_length=32)
    ids = torch.randint(0, 97, (2, 32))
    full = model(ids)
    for cuts in ([32], [1] * 32, [7, 1, 1, 10, 13], [16, 16]):
        cache, outs, at = KVCache.for_model(model, 2), [], 0
        for c in cuts:
            outs.append(forward_with_cache(model, ids[:, at:at + c], cache)); at += c
        torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit"):
        forward_with_cache(model, ids[:, :1], cache)  # the cache is full


def test_generate_restores_training_mode_and_checks_arguments():
    model = tiny(0, drop_rate=0.2).train()
    p = torch.zeros(1, 3, dtype=torch.long)
    a, b = generate(model, p, 10), generate(model, p, 10)
    assert torch.equal(a, b) and model.training  # dropout off while generating, training mode restored
    for bad, msg in [(dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_p=0.0), "top_p"),
                     (dict(max_new_tokens=-1), "max_new_tokens")]:
        with pytest.raises(ValueError, match=msg):
            generate(model, p, **{"max_new_tokens": 3, **bad})
    with pytest.raises(ValueError, match="batch, tokens"):
        generate(model, p[0], 3)


def test_eos_stops_each_row_and_pads_finished_ones():
    model = tiny(3)
    p = torch.randint(0, 97, (2, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, p, 30)
    eos = int(free[0, 6])  # row 0's third new token
    out = generate(model, p, 30, eos_id=eos)
    row0 = out[0, 4:].tolist()
    assert row0[2] == eos and all(t == eos for t in row0[2:])
    if eos in free[1, 4:].tolist():  # both rows finished: generation stopped early
        assert out.shape[1] == 4 + max(free[r, 4:].tolist().index(eos) for r in range(2)) + 1
    else:
        assert out.shape[1] == 34 and torch.equal(out[1], free[1])


logits_st = st.lists(st.floats(-20, 20, allow_nan=False, width=32), min_size=2, max_size=40).map(torch.tensor)


@settings(max_examples=200, deadline=None)
@given(logits_st, st.integers(1, 50))
def test_top_k_keeps_the_k_largest(logits, k):
    kept = top_k_filter(logits, k) > float("-inf")
    kth = torch.sort(logits, descending=True).values[min(k, len(logits)) - 1]
    assert torch.equal(kept, logits >= kth)  # ties with the k-th value are kept too
    assert kept.sum() >= min(k, len(logits))


@settings(max_examples=200, deadline=None)
@given(logits_st, st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(logits, p):
    probs = torch.softmax(logits.double(), 0)
    kept = top_p_filter(logits, p) > float("-inf")
    assert kept[logits == logits.max()].any()  # a most likely token always survives
    assert kept[0] or logits[0] < logits.max()  # ties resolve to the first (the sort is stable)
    mass = probs[kept].sum()
    assert mass >= p - 1e-5 or kept.all()
    # dropping the least likely kept token would fall below p: the set is minimal
    assert kept.sum() == 1 or mass - probs[kept].min() < p + 1e-5


def test_sample_next_never_picks_a_filtered_token():
    logits = torch.tensor([[5.0, 4.0, 3.0, -1.0, -2.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=g).flatten().tolist()) <= {0, 1}
    assert set(sample_next(logits, 5.0, top_p=0.5, generator=g).flatten().tolist()) <= {0, 1, 2}


def test_greedy_generation_matches_hugging_face_on_a_gpt2_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    weights = pytest.importorskip("llm_scratch.weights")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    hf.save_pretrained(tmp_path)
    ours = weights.load_gpt2(tmp_path).eval()
    prompt = torch.randint(0, 300, (1, 7), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False,
                      pad_token_id=0)
    assert torch.equal(generate(ours, prompt, 30), ref)
    assert torch.equal(generate(ours, prompt, 30, use_cache=False), ref)


@pytest.mark.parametrize("bad, msg", [
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx is an empty prompt"),
    (dict(idx=torch.tensor([[1, 64]])), r"idx holds token ids outside the vocabulary \[0, 64\): 64"),
    (dict(idx=torch.tensor([[1, -1]])), "outside the vocabulary.*: -1"),
    (dict(idx=torch.tensor([[1.0, 2.0]])), "idx must hold integer ids"),
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k="5"), "top_k must be an integer"),
    (dict(top_p=float("nan")), "top_p must be in"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
])
def test_generate_names_the_argument_it_cannot_use(bad, msg):
    model = tiny(0, vocab_size=64)
    with pytest.raises(ValueError, match=msg):
        generate(model, **{"idx": torch.tensor([[1, 2]]), "max_new_tokens": 3, **bad})


@pytest.mark.parametrize("prompt,new,held", [(5, 7, 12), (250, 20, 256)])
def test_the_cache_holds_the_positions_the_text_will_have_and_no_more(monkeypatch, prompt, new, held):
    "A long-context model must not allocate its whole context for a short generation (Llama 3.2 1B's is 131,072)."
    sizes, init = [], KVCache.__init__
    def spy(self, *a, **kw): init(self, *a, **kw); sizes.append(self.max_len)
    monkeypatch.setattr(KVCache, "__init__", spy)
    torch.manual_seed(0)
    model = GPTModel(GPTConfig.from_preset("tiny", vocab_size=64, context_length=256, drop_rate=0.0)).eval()
    ids = torch.randint(0, 64, (1, prompt))
    out = generate(model, ids, new)
    assert sizes == [held]  # one cache, as long as prompt + new tokens (at most the context)
    monkeypatch.setattr(KVCache, "__init__", init)
    assert torch.equal(out, generate(model, ids, new, use_cache=False))
