"""`llm_scratch_train --arch llama` on the one loop: a Llama-style model (RoPE, grouped-query attention, SwiGLU, RMSNorm,
experts) on 1 and 2 processes (DDP, tensor and pipeline parallel) against one process, exact resume, the run's folders
read back, generation from the run, and the options that do not fit the family refused."""
import io
import json
import subprocess

import pytest
import torch

from llm_scratch.checkpoint import load_trained
from llm_scratch.generate import generate, load_for_generation, main as generate_main
from llm_scratch.llama import LlamaModel, llama_config, llama_params, load_balancing_loss, load_llama
from llm_scratch.metrics import read_metrics
from llm_scratch.pretrain import calc_loss_batch
from llm_scratch.tokens import RunError
from llm_scratch.train import Pretraining, model_config, model_parallel, parse_args

from conftest import launch_command, rewound_copy

# a character vocabulary keeps the model (2 blocks x 64, 4 query and 2 key/value heads) and its checkpoints small
BASE = ["--arch", "llama", "--tokenizer", "char", "--data", "the-verdict", "--context-length", "64", "--lr", "1e-3",
        "--warmup", "2", "--log-every", "1", "--eval-every", "3", "--eval-batches", "2", "--no-progress",
        "--max-steps", "6", "--save-every", "3", "--precision", "fp32"]
MOE = ["--n-experts", "4", "--n-active", "2"]
# Under data parallelism each process balances the experts on its own tokens (as Megatron and transformers do): the
# load-balancing term of two half batches is not that of the whole batch, and Adam turns the ~1e-5 difference in the loss
# into ~1e-3 in some weights. With the term off, two processes must take the one process's steps.
NO_AUX = ["--router-aux-coef", "0"]


def train(env, args, nproc=1, launcher="torchrun", check=True):
    p = subprocess.run(launch_command("llm_scratch.train", args, nproc, launcher), env=env, capture_output=True, text=True,
                       timeout=300)
    if check and p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(out): return {r["step"]: r["loss"] for r in read_metrics(out)}


def params(model): return torch.cat([p.detach().flatten() for p in model.parameters()])


def gap(a: dict, b: dict) -> float: return max(abs(a[s] - b[s]) for s in a)


def test_llama_with_experts_on_one_and_two_processes_resumes_and_generates(env, tmp_path):
    train(env, BASE + MOE + NO_AUX + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    train(env, BASE + MOE + NO_AUX + ["--batch-size", "2", "--out", str(tmp_path / "ddp")], nproc=2, launcher="accelerate")
    train(env, BASE + MOE + NO_AUX + ["--batch-size", "4", "--strategy", "tp", "--out", str(tmp_path / "tp")], nproc=2)
    one, ddp, tp = (losses(tmp_path / n) for n in ("one", "ddp", "tp"))
    w = {n: params(load_llama(tmp_path / n / "final")) for n in ("one", "ddp", "tp")}
    print(f"ddp vs one: loss {gap(ddp, one):.1e}, params {(w['ddp'] - w['one']).abs().max():.1e}; "
          f"tp vs one: loss {gap(tp, one):.1e}, params {(w['tp'] - w['one']).abs().max():.1e}")
    assert sorted(one) == list(range(1, 7)) and one[6] < one[1] - 0.2  # it learns
    for name, a in (("tp", tp), ("ddp", ddp)):
        assert sorted(a) == list(range(1, 7)) and gap(a, one) < 1e-5 and (w[name] - w["one"]).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "ddp" / "checkpoints" / "step_000006" / "meta.json").read_text())
    assert cfg["arch"] == "llama" and cfg["model_config"]["n_experts"] == 4
    summary = json.loads((tmp_path / "ddp" / "run.json").read_text())
    mcfg = llama_config("tiny-llama", vocab_size=cfg["model_config"]["vocab_size"], context_length=64, n_experts=4)
    assert summary["parameters"] == llama_params(mcfg)["total"]
    assert summary["ranks"][0]["fingerprint"] == summary["ranks"][1]["fingerprint"]
    trained = load_trained(tmp_path / "ddp")
    assert isinstance(trained, LlamaModel) and torch.equal(params(trained), w["ddp"])
    # resume at step 3 on 2 processes: steps 4 to 6 come out bit for bit
    res = rewound_copy(tmp_path / "ddp", tmp_path / "resumed", 3)
    train(env, BASE + MOE + NO_AUX + ["--batch-size", "2", "--out", str(res), "--resume"], nproc=2, launcher="accelerate")
    assert losses(res) == ddp and torch.equal(params(load_llama(res / "final")), w["ddp"])
    # generation from the run: the command prints what greedy decoding of the final model gives
    model, tok, _ = load_for_generation(str(tmp_path / "ddp"))
    prompt = tok.encode_ordinary("I had")
    ids = generate(model, torch.tensor([prompt]), 20)[0].tolist()
    out = io.StringIO()
    assert generate_main(["--model", str(tmp_path / "ddp"), "--temperature", "0", "--max-new-tokens", "20", "I had"],
                         stdout=out) == 0
    assert out.getvalue() == "I had" + tok.decode(ids[len(prompt):]) + "\n"


def test_llama_pipeline_equals_one_process_and_refuses_experts(env, tmp_path):
    train(env, BASE + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    train(env, BASE + ["--batch-size", "4", "--strategy", "pp", "--out", str(tmp_path / "pp")], nproc=2)
    a, b = losses(tmp_path / "pp"), losses(tmp_path / "one")
    d = (params(load_llama(tmp_path / "pp" / "final")) - params(load_llama(tmp_path / "one" / "final"))).abs().max()
    print(f"pp vs one: loss {gap(a, b):.1e}, params {d:.1e}")
    assert sorted(a) == list(range(1, 7)) and gap(a, b) < 1e-5 and d < 1e-5
    cfg = parse_args(BASE + MOE + ["--strategy", "pp"])
    with pytest.raises(RunError, match="train a mixture of experts with ddp"): model_parallel(cfg, model_config(cfg, 65), 2)


def test_the_training_loss_of_experts_adds_their_load_balancing_loss():
    torch.manual_seed(0)
    model = LlamaModel(llama_config("tiny-llama", vocab_size=40, context_length=16, n_experts=4, router_aux_coef=0.5))
    x, y = torch.randint(0, 40, (3, 16)), torch.randint(0, 40, (3, 16))
    task = Pretraining.__new__(Pretraining)
    task.device = torch.device("cpu")
    total = task.loss(model, (x, y))
    ce = calc_loss_batch(x, y, model, task.device)
    assert torch.allclose(total, ce + 0.5 * load_balancing_loss(model.router_logits(), 2))
    dense = LlamaModel(llama_config("tiny-llama", vocab_size=40, context_length=16))
    assert torch.equal(task.loss(dense, (x, y)), calc_loss_batch(x, y, dense, task.device))


@pytest.mark.parametrize("args, msg", [
    (["--arch", "llama", "--dropout", "0.1"], "--dropout is not an option of --arch llama"),
    (["--n-kv-heads", "2"], "--n-kv-heads is not an option of --arch gpt2"),
    (["--arch", "llama", "--model", "tiny"], "'tiny' is not a llama preset"),
    (["--arch", "llama", "--n-heads", "4", "--n-kv-heads", "3"], "must be a multiple of n_kv_heads=3"),
    (["--arch", "llama", "--n-experts", "2", "--n-active", "3"], "n_active must be between 1 and n_experts=2"),
])
def test_options_that_do_not_fit_the_family_are_refused(args, msg, capsys):
    with pytest.raises(SystemExit): parse_args(args)
    assert msg in capsys.readouterr().err


def test_the_llama_options_shape_the_model():
    cfg = model_config(parse_args(["--arch", "llama", "--n-layers", "3", "--n-kv-heads", "1", "--hidden-dim", "96",
                                   "--qk-norm", "--rope-theta", "1e6", "--qkv-bias"]), 65)
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.qk_norm, cfg.rope_theta, cfg.attn_bias,
            cfg.vocab_size) == (3, 4, 1, 96, True, 1e6, True, 65)
    assert parse_args(["--arch", "llama"]).model == "tiny-llama" and parse_args([]).model == "tiny"


def test_fine_tuning_refuses_a_llama_folder_with_the_reason(tmp_path):
    from llm_scratch.finetune import initial_model
    from llm_scratch.llama import save_llama
    save_llama(LlamaModel(llama_config("tiny-llama", vocab_size=50257, n_layers=1)), tmp_path / "llama")
    with pytest.raises(RunError, match="holds a llama model; fine-tuning is written for GPT-2 models"):
        initial_model(str(tmp_path / "llama"))
