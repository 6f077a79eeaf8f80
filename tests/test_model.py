"""GPTModel against Hugging Face transformers (the oracle), checkpoint round trips, shapes, configs."""
import json

import pytest
import torch

from llm_scratch.model import PRESETS, GPTConfig, GPTModel, generate_simple, num_params
from llm_scratch.weights import CheckpointError, hf_state_dict, load_gpt2, save_gpt2

torch.set_num_threads(min(2, torch.get_num_threads()))


def hf():
    "Hugging Face's (GPT2Config, GPT2LMHeadModel), the oracle; the test is skipped without `transformers`."
    tf = pytest.importorskip("transformers")
    return tf.GPT2Config, tf.GPT2LMHeadModel


def hf_model(seed=0, **kw):
    "A randomly initialised Hugging Face GPT-2 in eval mode; `kw` are GPT2Config fields."
    GPT2Config, GPT2LMHeadModel = hf()
    torch.manual_seed(seed)
    kw.setdefault("vocab_size", 50257)
    if kw["vocab_size"] <= 50256: kw.update(bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(GPT2Config(**kw)).eval()


def max_diff(a, b): return (a - b).abs().max().item()


SMALL = [
    dict(n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=1000),
    dict(n_layer=3, n_embd=96, n_head=3, n_positions=32, vocab_size=517, tie_word_embeddings=False),
    dict(n_layer=1, n_embd=48, n_head=8, n_positions=16, vocab_size=50257, layer_norm_epsilon=1e-6),
]


@pytest.mark.parametrize("kw", SMALL, ids=["tied", "untied", "eps"])
def test_logits_match_hugging_face(kw, tmp_path):
    ref = hf_model(**kw)
    # perturb the LayerNorms and biases, which start at 1 and 0 and would hide a mix-up
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or ".ln_" in n: p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    assert ours.cfg.tie_weights == kw.get("tie_word_embeddings", True)
    idx = torch.randint(0, kw["vocab_size"], (2, kw["n_positions"]))
    with torch.no_grad():
        assert max_diff(ours(idx), ref(idx).logits) < 1e-4


def test_logits_match_hugging_face_124m(tmp_path):
    ref = hf_model(seed=1)  # GPT-2 small's shape: 12 layers, 768 wide, 12 heads, 1024 positions
    ref.save_pretrained(tmp_path)
    ours = load_gpt2(tmp_path)
    assert num_params(ours) == 124_439_808 == ref.num_parameters()
    idx = torch.randint(0, 50257, (1, 64))
    with torch.no_grad():
        d = max_diff(ours(idx), ref(idx).logits)
    print(f"124M parity: max |logits difference| {d:.1e}")
    assert d < 1e-4


def test_hub_layout_loads(tmp_path):
    "The files on the hub: no `transformer.` prefix, mask buffers, no config.json; the preset supplies it."
    from safetensors.torch import load_file, save_file
    ref = hf_model(n_layer=2, n_embd=64, n_head=4, n_positions=32)
    ref.save_pretrained(tmp_path / "hf")
    sd = {k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}
    sd.update({f"h.{i}.attn.bias": torch.ones(1, 1, 32, 32).tril() for i in range(2)})
    save_file(sd, tmp_path / "hub.safetensors")
    cfg_kw = dict(vocab_size=50257, context_length=32, emb_dim=64, n_heads=4, n_layers=2)
    PRESETS["test-hub"] = cfg_kw
    try: ours = load_gpt2(tmp_path / "hub.safetensors", preset="test-hub")
    finally: del PRESETS["test-hub"]
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad(): assert max_diff(ours(idx), ref(idx).logits) < 1e-4


@pytest.mark.parametrize("changes", [{}, {"tie_weights": False}, {"qkv_bias": False}], ids=["tied", "untied", "nobias"])
def test_save_gpt2_loads_in_hugging_face(changes, tmp_path):
    torch.manual_seed(0)
    ours = GPTModel(GPTConfig.from_preset("tiny", **changes)).eval()
    save_gpt2(ours, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    ref = hf()[1].from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 50257, (2, 40))
    with torch.no_grad():
        assert max_diff(ours(idx), ref(idx).logits) < 1e-5
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] == ours.cfg.tie_weights


def test_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    m = GPTModel(GPTConfig.from_preset("tiny")).eval()
    back = load_gpt2(save_gpt2(m, tmp_path / "a"))
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad(): assert torch.equal(back(idx), m(idx))
    assert back.out_head.weight is back.tok_emb.weight


def test_load_errors_list_every_problem(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(0)
    m = GPTModel(GPTConfig.from_preset("tiny"))
    sd = hf_state_dict(m)
    del sd["transformer.ln_f.bias"], sd["transformer.h.0.mlp.c_fc.bias"]
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(3, 3)
    sd["transformer.extra"] = torch.zeros(1)
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 64, "n_head": 4, "n_layer": 2, "n_positions": 128,
                                                      "vocab_size": 50257}))
    with pytest.raises(CheckpointError) as e: load_gpt2(tmp_path)
    msg = str(e.value)
    assert "2 missing: h.0.mlp.c_fc.bias, ln_f.bias" in msg
    assert "1 unexpected: extra" in msg
    assert "h.0.attn.c_proj.weight: (3, 3), expected (64, 64)" in msg
    with pytest.raises(FileNotFoundError, match="neither a checkpoint name"): load_gpt2("gpt2-tiny")


def test_unsupported_config_is_refused(tmp_path):
    save_gpt2(GPTModel(GPTConfig.from_preset("tiny")), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(CheckpointError, match="scale_attn_by_inverse_layer_idx=True"): load_gpt2(tmp_path)


# --- shapes and configs ---------------------------------------------------------------------

def test_forward_shapes_and_context_error():
    m = GPTModel(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 50257, (3, 7))
    assert m(idx).shape == (3, 7, 50257)
    logits, attn = m(idx, return_attn=True)
    assert len(attn) == 2 and attn[0].shape == (3, 4, 7, 7)
    with pytest.raises(ValueError, match="context_length is 128"): m(torch.zeros(1, 129, dtype=torch.long))
    out = generate_simple(m, idx[:1], 5, 128)
    assert out.shape == (1, 12) and torch.equal(out[:, :7], idx[:1])


@pytest.mark.parametrize("name,count", [("gpt2-small", 124_439_808), ("gpt2-medium", 354_823_168),
                                        ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_preset_parameter_counts(name, count):
    GPT2Config, GPT2LMHeadModel = hf()
    with torch.device("meta"):
        ours = GPTModel(GPTConfig.from_preset(name))
        ref = GPT2LMHeadModel(GPT2Config(n_embd=ours.cfg.emb_dim, n_layer=ours.cfg.n_layers, n_head=ours.cfg.n_heads))
    assert num_params(ours) == count == ref.num_parameters()


@pytest.mark.parametrize("kw,msg", [
    (dict(emb_dim=100, n_heads=12), "not divisible by n_heads=12"),
    (dict(n_heads=0), "n_heads must be a positive integer"),
    (dict(vocab_size=-1), "vocab_size must be a positive integer"),
    (dict(context_length=1.5), "context_length must be a positive integer"),
    (dict(n_layers=True), "n_layers must be a positive integer"),
    (dict(drop_rate=-0.1), "drop_rate must be in [0, 1)"),
])
def test_invalid_configs(kw, msg):
    with pytest.raises(ValueError) as e: GPTConfig(**kw)
    assert msg in str(e.value)


def test_presets_and_overrides():
    with pytest.raises(ValueError, match="Known presets: gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, tiny"):
        GPTConfig.from_preset("gpt3")
    with pytest.raises(ValueError, match=r"Unknown GPTConfig field\(s\) \['layers'\]"):
        GPTConfig.from_preset("tiny", layers=3)
    with pytest.raises(ValueError, match="not divisible"):
        GPTConfig.from_preset("gpt2-small", n_heads=7)
    assert GPTConfig.from_preset("gpt2-xl", context_length=256).context_length == 256


def test_fresh_loss_is_near_uniform():
    torch.manual_seed(0)
    m = GPTModel(GPTConfig.from_preset("tiny")).eval()
    idx = torch.randint(0, 50257, (4, 65))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(m(idx[:, :-1]).flatten(0, 1), idx[:, 1:].flatten())
    assert abs(loss.item() - torch.log(torch.tensor(50257.0)).item()) < 0.05
