"""`LlamaModel` against `transformers`: logits for Llama-, Qwen2-, Qwen3-, Qwen3-MoE- and Mixtral-shaped random models at
several lengths, checkpoint folders both ways, RoPE scaling, the load-balancing loss, preset sizes, the KV cache."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (LlamaConfig as HFLlama, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from llm_scratch.generate import generate
from llm_scratch.llama import (LLAMA_PRESETS, config_from_hf, llama_config, llama_params, load_balancing_loss,
                               load_llama, rope_frequencies, save_llama)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=256)
FAMILIES = {  # name: (model class, config) -- random weights, tiny shapes, grouped-query attention everywhere
    "llama": lambda: LlamaForCausalLM(HFLlama(**SMALL, num_attention_heads=8, num_key_value_heads=2,
                                              tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                                  tie_word_embeddings=True, rope_parameters={"rope_type": "default",
                                                                                             "rope_theta": 1e6})),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                                  tie_word_embeddings=True)),  # biases in q, k and v
    "qwen3_moe": lambda: Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, num_attention_heads=4, num_key_value_heads=2,
                                                            head_dim=16, moe_intermediate_size=48, num_experts=4,
                                                            num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                                                            norm_topk_prob=True, tie_word_embeddings=False,
                                                            output_router_logits=True)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SMALL, num_attention_heads=4, num_key_value_heads=1,
                                                        num_local_experts=4, num_experts_per_tok=2,
                                                        tie_word_embeddings=False)),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    "A random `transformers` model of one family, and ours read from the folder its `save_pretrained` wrote."
    torch.manual_seed(0)
    ref = FAMILIES[request.param]().eval()
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder)
    return request.param, ref, load_llama(folder), folder


@pytest.mark.parametrize("T", [1, 5, 64, 256])
def test_logits_equal_transformers(pair, T):
    name, ref, ours, _ = pair
    ids = torch.randint(0, 300, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad(): d = (ours(ids) - ref(ids).logits).abs().max().item()
    assert d <= 1e-4, (name, T, d)


def test_the_folder_we_write_is_the_one_transformers_reads(pair, tmp_path):
    name, ref, ours, _ = pair
    save_llama(ours, tmp_path)
    back = type(ref).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (1, 33))
    with torch.no_grad(): assert (back(ids).logits - ref(ids).logits).abs().max() <= 1e-5, name
    assert torch.equal(load_llama(tmp_path).state_dict()["tok_emb.weight"], ours.state_dict()["tok_emb.weight"])


def test_the_kv_cache_gives_the_uncached_tokens(pair):
    name, _, ours, _ = pair
    prompt = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(ours, prompt, 25), generate(ours, prompt, 25, use_cache=False)), name


def test_the_load_balancing_loss_is_transformers(pair):
    name, ref, ours, _ = pair
    if name not in ("qwen3_moe", "mixtral"): pytest.skip("a dense model has no router")
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        theirs = ref(ids, output_router_logits=True).router_logits
        ours(ids)
    k = ours.cfg.n_active
    assert abs(load_balancing_loss(ours.router_logits(), k) - load_balancing_loss_func(theirs, ours.cfg.n_experts, k)) < 1e-5


def test_llama3_rope_scaling_is_transformers():
    from transformers.modeling_rope_utils import _compute_llama3_parameters
    cfg = HFLlama(hidden_size=2048, num_attention_heads=32, rope_parameters={**LLAMA3_ROPE, "factor": 32.0,
                                                                              "original_max_position_embeddings": 8192})
    theirs, _ = _compute_llama3_parameters(cfg, "cpu")
    assert torch.allclose(rope_frequencies(64, 500_000.0, (32.0, 1.0, 4.0, 8192)), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name,hf", [
    ("llama-3.2-1b", lambda: LlamaForCausalLM(HFLlama(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                      num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                                                      tie_word_embeddings=True))),
    ("qwen3-0.6b", lambda: Qwen3ForCausalLM(Qwen3Config(vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                                                        num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                                                        head_dim=128, tie_word_embeddings=True))),
])
def test_preset_sizes_equal_the_published_shapes_built_by_transformers(name, hf):
    with torch.device("meta"): ref = hf()
    assert llama_params(llama_config(name))["total"] == sum(p.numel() for p in ref.parameters())


def test_configs_read_back_and_bad_ones_are_refused():
    for name in LLAMA_PRESETS:
        from llm_scratch.llama import config_to_hf
        cfg = llama_config(name)
        assert config_from_hf(config_to_hf(cfg)) == cfg, name
    with pytest.raises(ValueError, match="model_type 'gpt2'"): config_from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="multiple of n_kv_heads"): llama_config("tiny-llama", n_kv_heads=3)
    with pytest.raises(FileNotFoundError, match="no config.json"): load_llama("/nonexistent")
