"""Properties of the attention layers: every implementation agrees, and attention is causal."""
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_scratch.attention import (CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, attend,
                                   causal_mask)

shapes = st.tuples(st.integers(1, 3), st.integers(1, 4), st.integers(1, 12), st.integers(1, 16))  # b, heads, T, head_dim


@settings(max_examples=25, deadline=None)
@given(shapes, st.integers(0, 2**16))
def test_attend_matches_sdpa(shape, seed):
    b, h, T, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, b, h, T, d, generator=g).unbind(0)
    ctx, w = attend(q, k, v, causal_mask(T))
    assert torch.allclose(ctx, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    assert torch.allclose(w.sum(-1), torch.ones(b, h, T), atol=1e-5)
    assert (w.masked_select(causal_mask(T)) == 0).all()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 10), st.integers(0, 2**16))
def test_fused_equals_wrapper(d_head, n_heads, T, seed):
    torch.manual_seed(seed)
    d_in = 5
    wrapper = MultiHeadAttentionWrapper(d_in, d_head, 16, n_heads=n_heads).eval()
    fused = MultiHeadAttention(d_in, d_head * n_heads, 16, n_heads=n_heads).eval()
    with torch.no_grad():
        fused.qkv.weight.copy_(torch.cat([torch.cat([getattr(hd, W).weight for hd in wrapper.heads])
                                          for W in ("W_query", "W_key", "W_value")]))
        fused.proj.weight.copy_(torch.eye(d_head * n_heads)); fused.proj.bias.zero_()
    x = torch.randn(2, T, d_in)
    with torch.no_grad():
        for use_sdpa in (False, True):
            fused.use_sdpa = use_sdpa
            assert torch.allclose(fused(x), wrapper(x), atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(2, 12), st.integers(0, 2**16))
def test_future_tokens_do_not_leak(T, seed):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(8, 8, 16, n_heads=2, qkv_bias=True).eval()
    x = torch.randn(1, T, 8)
    t = int(torch.randint(0, T - 1, ()))
    y = x.clone(); y[:, t + 1:] = torch.randn_like(y[:, t + 1:])
    with torch.no_grad():
        assert torch.allclose(mha(x)[:, :t + 1], mha(y)[:, :t + 1], atol=1e-5)


def test_weights_path_and_fast_path_agree_in_eval_and_dropout_is_active_in_train():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 16, 32, dropout=0.5, n_heads=4)
    x = torch.randn(2, 10, 16)
    mha.eval()
    with torch.no_grad():
        out, w = mha(x, return_weights=True)
        assert torch.allclose(out, mha(x), atol=1e-6) and w.shape == (2, 4, 10, 10)
    mha.train()
    with torch.no_grad():
        assert not torch.allclose(mha(x), out, atol=1e-3)  # dropout changes the output in training


def test_causal_mask_offsets():
    assert torch.equal(causal_mask(3, 5), causal_mask(5)[2:])
    assert not causal_mask(1, 9).any()
    ca = CausalAttention(4, 4, context_length=8)
    assert ca.mask.shape == (8, 8) and "mask" not in ca.state_dict()
