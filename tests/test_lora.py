"""LoRA: starts equal to the base, merge == unmerged at many shapes (also after training), targets, counts, save/load."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from llm_scratch.classify import classification_logits, make_classifier, trainable_params
from llm_scratch.lora import (LoRALinear, apply_lora, load_lora, lora_layers, lora_state_dict, matches, merge_lora,
                              save_lora, unmerge_lora)
from llm_scratch.model import GPTConfig, GPTModel

TOL = dict(atol=1e-5, rtol=1e-5)  # merged vs unmerged, float32: the same sums in another order


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=kw.pop("emb_dim", 32), n_heads=4,
                    n_layers=kw.pop("n_layers", 2), drop_rate=0.0, **kw)
    return make_classifier(GPTModel(cfg)).eval()


def randomise_b(model_or_layer, seed=0, std=0.05):
    g = torch.Generator().manual_seed(seed)
    layers = [model_or_layer] if isinstance(model_or_layer, LoRALinear) else lora_layers(model_or_layer).values()
    with torch.no_grad():
        for layer in layers: layer.B.copy_(torch.randn(layer.B.shape, generator=g) * std)


# ---------------------------------------------------------------- the layer
def test_starts_equal_to_the_base_and_freezes_it():
    torch.manual_seed(0)
    base = nn.Linear(20, 30)
    lora = LoRALinear(base, rank=4, alpha=8)
    x = torch.randn(3, 5, 20)
    assert torch.equal(lora(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    assert lora.A.shape == (20, 4) and lora.B.shape == (4, 30) and lora.scale == 2.0
    bound = 1 / math.sqrt(4)  # kaiming_uniform_(a=sqrt(5)) on (in, rank): fan-in = rank
    assert lora.A.abs().max() <= bound and lora.A.abs().max() > 0.5 * bound


def test_forward_is_the_formula_and_gradients_flow_to_b_first():
    torch.manual_seed(1)
    base = nn.Linear(16, 8, bias=False)
    lora = LoRALinear(base, rank=3, alpha=6)
    x = torch.randn(7, 16)
    lora(x).sum().backward()
    assert base.weight.grad is None
    assert lora.A.grad.abs().max() == 0 and lora.B.grad.abs().max() > 0  # B = 0 at first: A's gradient is zero
    randomise_b(lora)
    with torch.no_grad():
        torch.testing.assert_close(lora(x), x @ base.weight.T + 2.0 * x @ lora.A @ lora.B)
        torch.testing.assert_close(lora.delta_weight(), 2.0 * (lora.A @ lora.B).T)


def test_layer_errors():
    with pytest.raises(TypeError, match="nn.Linear"): LoRALinear(nn.Conv1d(2, 2, 1), 2)
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="positive integer"): LoRALinear(nn.Linear(2, 2), bad)


@pytest.mark.parametrize("d_in,d_out,rank,bias", [(1, 1, 1, True), (8, 3, 2, False), (64, 192, 8, True),
                                                  (256, 64, 16, True), (768, 2304, 16, True), (5, 700, 64, False)])
@pytest.mark.parametrize("lead", [(), (4,), (2, 3)])
def test_merge_equals_unmerged_at_many_shapes(d_in, d_out, rank, bias, lead):
    torch.manual_seed(d_in + d_out)
    base = nn.Linear(d_in, d_out, bias=bias)
    lora = LoRALinear(base, rank, alpha=2 * rank)
    randomise_b(lora, std=0.1)
    x = torch.randn(*lead, d_in)
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        y = lora(x)
        lora.merge(); lora.merge()  # idempotent
        assert lora.merged
        torch.testing.assert_close(lora(x), y, **TOL)
        torch.testing.assert_close(lora(x), F.linear(x, w0 + lora.delta_weight(), base.bias), **TOL)
        lora.unmerge(); lora.unmerge()
        torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lora(x), y, **TOL)


@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 12), st.floats(0.5, 64), st.integers(0, 100))
@settings(max_examples=60, deadline=None)
def test_merge_property(d_in, d_out, rank, alpha, seed):
    torch.manual_seed(seed)
    lora = LoRALinear(nn.Linear(d_in, d_out), rank, alpha)
    randomise_b(lora, seed)
    x = torch.randn(6, d_in)
    with torch.no_grad():
        y = lora(x); lora.merge()
        torch.testing.assert_close(lora(x), y, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- the model
def test_matches():
    assert matches("blocks.0.att.qkv", "qkv") and matches("blocks.10.ff.proj", "ff.proj")
    assert matches("out_head", "out_head") and matches("blocks.1.ff.fc", "blocks.1")
    assert not matches("blocks.10.ff.fc", "blocks.1") and not matches("blocks.0.att.qkv", "qk")


@pytest.mark.parametrize("targets,expect", [
    (("qkv",), {"att.qkv"}), (("att",), {"att.qkv", "att.proj"}), (("ff",), {"ff.fc", "ff.proj"}),
    (("proj",), {"att.proj", "ff.proj"}), (("att.proj", "fc"), {"att.proj", "ff.fc"}),
    (("qkv", "proj", "ff"), {"att.qkv", "att.proj", "ff.fc", "ff.proj"})])
def test_targets_pick_layers_by_dotted_parts(targets, expect):
    model = apply_lora(tiny(n_layers=3), rank=2, targets=targets)
    names = set(lora_layers(model))
    assert names == {f"blocks.{i}.{e}" for i in range(3) for e in expect}


def test_only_one_block_and_head_as_target():
    model = apply_lora(tiny(n_layers=3), rank=2, targets=("blocks.2", "out_head"), train=())
    assert set(lora_layers(model)) == {f"blocks.2.{e}" for e in ("att.qkv", "att.proj", "ff.fc", "ff.proj")} | {"out_head"}
    assert trainable_params(model) == 2 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32)) + 2 * (32 + 2)


def test_apply_lora_freezes_everything_else_and_counts():
    model = apply_lora(tiny(), rank=4, alpha=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in lora_layers(model) for ab in "AB"} | {"out_head.weight", "out_head.bias"}
    per_block = 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert trainable_params(model) == 2 * per_block + 32 * 2 + 2
    assert model.lora_config == dict(rank=4, alpha=8, targets=("qkv", "proj", "ff"), train=("out_head",))


def test_apply_lora_errors():
    with pytest.raises(ValueError, match=r"\['qvk'\] match no module"): apply_lora(tiny(), targets=("qvk", "ff"))
    with pytest.raises(ValueError, match="train modules"): apply_lora(tiny(), train=("head",))
    with pytest.raises(ValueError, match="both"): apply_lora(tiny(), targets=("ff", "out_head"))
    with pytest.raises(ValueError, match="targets is empty"): apply_lora(tiny(), targets=())
    model = apply_lora(tiny())
    with pytest.raises(ValueError, match="already has LoRA"): apply_lora(model)


def test_gpt2_small_counts_on_meta():
    with torch.device("meta"):
        ours = apply_lora(make_classifier(GPTModel(GPTConfig.from_preset("gpt2-small"))), rank=16, alpha=16)
        book = apply_lora(make_classifier(GPTModel(GPTConfig.from_preset("gpt2-small"))), rank=16, alpha=16,
                          targets=("qkv", "proj", "ff", "out_head"), train=())
    assert trainable_params(ours) == 2_360_834
    assert trainable_params(book) == 2_371_616  # the book's layout with separate q, k, v has 2,666,528


def test_wrapped_model_starts_equal_and_merges_after_training():
    model = tiny(5)
    ids = torch.randint(0, 97, (4, 20))
    lengths = torch.tensor([20, 3, 11, 1])
    with torch.no_grad(): ref = classification_logits(model, ids, lengths)
    apply_lora(model, rank=4, alpha=8, targets=("qkv", "proj", "ff", "out_head"), train=())
    with torch.no_grad(): torch.testing.assert_close(classification_logits(model, ids, lengths), ref, atol=0, rtol=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    targets = torch.tensor([0, 1, 1, 0])
    model.train()
    for _ in range(15):
        loss = F.cross_entropy(classification_logits(model, ids, lengths), targets)
        opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    with torch.no_grad():
        unmerged = classification_logits(model, ids, lengths)
        assert (unmerged - ref).abs().max() > 1e-2  # training moved it
        merge_lora(model)
        torch.testing.assert_close(classification_logits(model, ids, lengths), unmerged, **TOL)
        unmerge_lora(model)
        torch.testing.assert_close(classification_logits(model, ids, lengths), unmerged, **TOL)


def test_training_a_merged_model_is_refused():
    model = merge_lora(apply_lora(tiny())).train()
    with pytest.raises(RuntimeError, match="unmerge_lora"): model(torch.zeros(1, 3, dtype=torch.long))
    with torch.no_grad(): model(torch.zeros(1, 3, dtype=torch.long))  # inference is fine
    unmerge_lora(model)(torch.zeros(1, 3, dtype=torch.long)).sum().backward()


# ---------------------------------------------------------------- the adapter file
def test_save_and_load_round_trip(tmp_path):
    model = apply_lora(tiny(7), rank=4, alpha=4)
    randomise_b(model, 3)
    with torch.no_grad(): model.out_head.weight.add_(1.0)
    path = save_lora(model, tmp_path / "a" / "adapter.pt")
    assert [p.name for p in path.parent.iterdir()] == ["adapter.pt"]  # written atomically, no temp file left
    saved = torch.load(path, weights_only=True)
    assert set(saved["state"]) == set(lora_state_dict(model))
    assert all(k.endswith((".A", ".B")) or k.startswith("out_head.") for k in saved["state"])
    fresh = tiny(7)  # the same base weights
    load_lora(fresh, path)
    ids = torch.randint(0, 97, (3, 12))
    with torch.no_grad(): assert torch.equal(fresh(ids), model(ids))
    again = apply_lora(tiny(7), rank=4, alpha=4)  # LoRA applied already, same settings: also fine
    load_lora(again, path)
    with torch.no_grad(): assert torch.equal(again(ids), model(ids))


def test_load_errors(tmp_path):
    model = apply_lora(tiny(), rank=4)
    path = save_lora(model, tmp_path / "adapter.pt")
    with pytest.raises(ValueError, match="saved with"): load_lora(apply_lora(tiny(), rank=2), path)
    with pytest.raises(ValueError, match="merged"): load_lora(merge_lora(apply_lora(tiny(), rank=4)), path)
    with pytest.raises(ValueError, match="does not fit"): load_lora(tiny(n_layers=3), path)
    with pytest.raises(ValueError, match="apply_lora first"): save_lora(tiny(), tmp_path / "x.pt")


def test_the_adapters_are_drawn_in_the_models_order_whatever_the_hash_seed():
    "Processes of one run hash strings differently; each must still draw the same adapters (FSDP does not broadcast)."
    import os, subprocess, sys
    code = ("import torch; from llm_scratch.lora import apply_lora; from llm_scratch.model import GPTConfig, GPTModel; "
            "m = GPTModel(GPTConfig.from_preset('tiny')); torch.manual_seed(0); apply_lora(m, 2); "
            "print(sum(float(p.sum()) * (i + 1) for i, p in enumerate(p for n, p in m.named_parameters() if n.endswith('.A'))))")
    out = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(s)}, check=True,
                          capture_output=True, text=True).stdout for s in range(4)}
    assert len(out) == 1, out


def test_a_peft_adapter_loads_onto_hugging_face_gpt2_with_our_merged_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import GPT2LMHeadModel
    from llm_scratch.lora import apply_lora, lora_layers, merge_lora, save_peft
    from llm_scratch.model import GPTConfig, GPTModel
    from llm_scratch.weights import save_gpt2
    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=500, context_length=32, emb_dim=48, n_heads=4, n_layers=2, drop_rate=0.0))
    hub = save_gpt2(base, tmp_path / "base")
    for targets in (("qkv", "proj", "ff"), ("att.proj",)):  # every linear layer; one kind that shares a name with others
        tuned = apply_lora(copy.deepcopy(base), rank=4, alpha=8, targets=targets, train=())
        for layer in lora_layers(tuned).values(): torch.nn.init.normal_(layer.B, std=0.05)
        adapter = save_peft(tuned, tmp_path / "-".join(targets), base_model=str(hub))
        hf = peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(hub), adapter).eval()
        adapted = {n for n, m in hf.named_modules() if n.endswith("lora_A")}
        assert len(adapted) == len(lora_layers(tuned))  # exactly the layers we adapted, no more
        ids = torch.randint(0, 500, (2, 16))
        with torch.no_grad():
            ours, theirs, plain = merge_lora(tuned.eval())(ids), hf(ids).logits, base.eval()(ids)
        assert (ours - theirs).abs().max() < 1e-4 < (ours - plain).abs().max()  # equal, and the update matters
