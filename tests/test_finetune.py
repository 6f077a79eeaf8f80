"""`llm_scratch_finetune` on several CPU processes (gloo, DDP through `accelerate launch`): every logged loss of
two processes with batch b equals one process with batch 2b, for both tasks, under DDP and FSDP; a run killed with -9 resumes bit for bit
on one and two processes; and the command's errors."""
import json
import subprocess
import time

import pytest
import torch

from llm_scratch.metrics import read_metrics

from conftest import kill_tree, launch_command

# float32: the process layouts are compared to 1e-4 (in bf16 autocast, the default on a CPU with AMX, they agree to ~2e-4)
BASE = ["--init", "scratch:tiny", "--epochs", "1", "--lr", "1e-3", "--eval-every", "3", "--no-progress", "--precision", "fp32"]


def run(env, args, nproc=1, check=True):
    cmd = launch_command("llm_scratch.finetune", args, nproc)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def compare(one, two, key="loss", tol=1e-4):
    a, b = ([r for r in read_metrics(d) if key in r] for d in (one, two))
    assert len(a) == len(b) > 0
    for r, s in zip(a, b):
        assert r["step"] == s["step"]
        assert abs(r[key] - s[key]) <= tol * max(1.0, abs(r[key])), (r, s)


@pytest.mark.parametrize("task,extra", [
    ("classify", ["--train", "all", "--limit", "96"]),
    ("instruct", ["--limit", "32", "--generate", "1", "--max-new-tokens", "4", "--mask-prompt"]),
    ("classify", ["--train", "lora", "--lora-rank", "2", "--limit", "64", "--strategy", "fsdp"]),
])
def test_two_processes_take_the_steps_of_one(env, tmp_path, task, extra):
    env = {k: v for k, v in env.items() if k != "PYTHONHASHSEED"}  # each process hashes strings its own way
    run(env, [task, *BASE, *extra, "--batch-size", "8", "--out", str(tmp_path / "one")])
    run(env, [task, *BASE, *extra, "--batch-size", "4", "--out", str(tmp_path / "two")], nproc=2)
    compare(tmp_path / "one", tmp_path / "two")
    compare(tmp_path / "one", tmp_path / "two", key="val_loss" if task == "instruct" else "val_accuracy")
    r1, r2 = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert r2["world_size"] == 2 and r1["steps"] == r2["steps"]
    for k in ("val_loss", "test_accuracy", "train_accuracy"):
        if k in r1: assert abs(r1[k] - r2[k]) < 1e-4, (k, r1[k], r2[k])
    assert (tmp_path / "two" / "loss.png").stat().st_size > 1000
    if task == "instruct": chat_answers_in_the_trained_format(tmp_path / "one")


def chat_answers_in_the_trained_format(run_folder):
    "`llm_scratch_generate --chat` on an instruction-tuned run: each line's answer is `generate`'s for the Alpaca prompt."
    import io
    from llm_scratch.generate import generate, main
    from llm_scratch.instruct import format_prompt, format_response
    from llm_scratch.text import EOT_ID, gpt2_tokenizer
    from llm_scratch.weights import load_gpt2
    assert "chat_template" in json.loads((run_folder / "final" / "tokenizer_config.json").read_text())
    shown, asked = io.StringIO(), ["Name a primary colour.", "Say hello."]
    assert main(["--model", str(run_folder), "--chat", "--temperature", "0", "--max-new-tokens", "6"],
                stdin=io.StringIO("\n".join(asked) + "\n"), stdout=shown) == 0
    model, tok, expected = load_gpt2(run_folder / "final"), gpt2_tokenizer(), ""
    for q in asked:
        prompt = format_prompt({"instruction": q, "input": ""}) + format_response({"output": ""})
        ids = torch.tensor([tok.encode(prompt)])
        new = generate(model, ids, 6, eos_id=EOT_ID)[0, ids.shape[1]:].tolist()
        expected += tok.decode(new[:new.index(EOT_ID)] if EOT_ID in new else new) + "\n"
    assert shown.getvalue() == expected


def test_lora_classifier_trains_few_parameters_and_saves_a_plain_model(env, tmp_path):
    run(env, ["classify", *BASE, "--train", "lora", "--lora-rank", "2", "--limit", "48", "--out", str(tmp_path / "r")])
    res = json.loads((tmp_path / "r" / "results.json").read_text())
    assert 0 < res["trainable_parameters"] < res["parameters"] / 10
    from llm_scratch.finetune import load_classifier
    model, meta = load_classifier(tmp_path / "r" / "final")  # merged: loads into a plain GPTModel classifier
    assert meta["max_length"] <= model.cfg.context_length


def test_errors_say_what_to_do(env, tmp_path):
    p = run(env, ["classify", "--init", "no-such-model", "--out", str(tmp_path / "x")], check=False)
    assert p.returncode == 2 and "neither a GPT-2 checkpoint" in p.stderr
    p = run(env, ["instruct", "--train", "head"], check=False)
    assert p.returncode == 2 and "invalid choice" in p.stderr
    p = run(env, ["classify", *BASE, "--limit", "4", "--batch-size", "8", "--out", str(tmp_path / "y")], check=False)
    assert p.returncode == 2 and "lower --batch-size" in p.stderr


def weights(folder):
    "The tensors of a finished run's `final/` model."
    from safetensors.torch import load_file
    return load_file(str(folder / "final" / "model.safetensors"))


@pytest.mark.parametrize("nproc,args", [
    (1, ["classify", "--train", "lora", "--lora-rank", "2", "--limit", "160", "--batch-size", "4", "--dropout", "0.1"]),
    (2, ["instruct", "--limit", "64", "--batch-size", "2", "--mask-prompt", "--generate", "1", "--max-new-tokens", "4",
         "--dropout", "0.1", "--grad-accum", "2", "--warmup", "3", "--min-lr", "1e-4", "--grad-clip", "1",
         "--strategy", "fsdp"]),
])
def test_a_killed_run_resumes_bit_for_bit(env, tmp_path, nproc, args):
    "`kill -9` of every process after a checkpoint, then --resume: the losses and weights of the uninterrupted run."
    args = [*args, "--init", "scratch:tiny", "--epochs", "2", "--lr", "1e-3", "--eval-every", "5", "--save-every", "3",
            "--no-progress"]
    subprocess.run(launch_command("llm_scratch.finetune", args + ["--out", str(tmp_path / "straight")], nproc), env=env, check=True,
                   capture_output=True, timeout=600)
    out = tmp_path / "killed"
    p = subprocess.Popen(launch_command("llm_scratch.finetune", args + ["--out", str(out)], nproc), env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 300
    while p.poll() is None and time.time() < deadline:  # kill once a checkpoint is whole and later steps are logged
        if latest.is_file() and (out / "metrics.jsonl").is_file():
            rows = read_metrics(out)
            if rows and rows[-1]["step"] > int(latest.read_text()[5:]): break
        time.sleep(0.002)
    kill_tree(p)
    p.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"
    killed_at = read_metrics(out)[-1]["step"]
    subprocess.run(launch_command("llm_scratch.finetune", args + ["--out", str(out), "--resume"], nproc), env=env, check=True,
                   capture_output=True, timeout=600)
    straight, resumed = read_metrics(tmp_path / "straight"), read_metrics(out)
    print(f"{nproc} process(es): killed after step {killed_at} of {straight[-1]['step']}")
    assert [r["step"] for r in resumed] == [r["step"] for r in straight]
    for key in ("loss", "lr", "val_loss", "val_accuracy", "epoch"):
        assert [r.get(key) for r in resumed] == [r.get(key) for r in straight], key
    a, b = weights(tmp_path / "straight"), weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_instruction_lora_run_also_saves_its_adapter_in_peft_layout(env, tmp_path):
    from safetensors.torch import load_file
    run(env, ["instruct", *BASE, "--train", "lora", "--lora-rank", "2", "--lora-alpha", "4", "--limit", "24",
              "--batch-size", "8", "--generate", "1", "--max-new-tokens", "2", "--out", str(tmp_path / "r")])
    config = json.loads((tmp_path / "r" / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 2, 4, "CAUSAL_LM")
    weights = load_file(tmp_path / "r" / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * len(config["target_modules"]) and any(w.abs().sum() > 0 for k, w in weights.items()
                                                                      if "lora_B" in k)  # B trained away from zero
