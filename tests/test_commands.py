"""The practitioner's commands end to end: a model of any shape, `--precision auto`, what `accelerate launch` was told,
the summary a run ends with, `final/` as a complete Hugging Face folder that `transformers.pipeline` reads, and
`llm_scratch_generate` (prompt from the command line, a file or stdin; streaming; errors; `--chat`)."""
import io
import json
import subprocess
import sys

import pytest

from llm_scratch.generate import main as generate_main
from llm_scratch.hardware import bf16_native

NANO = ["--model", "tiny", "--data", "the-verdict", "--n-layers", "2", "--n-heads", "2", "--emb-dim", "64",
        "--context-length", "32", "--batch-size", "4", "--max-steps", "6", "--eval-every", "3", "--log-every", "1",
        "--lr", "3e-3", "--warmup", "1", "--no-progress"]


def train(env, args, launcher=(), check=True):
    p = subprocess.run([*(launcher or [sys.executable]), "-m", "llm_scratch.train", *args], env=env,
                       capture_output=True, text=True, timeout=600)
    if check: assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


@pytest.fixture(scope="module")
def nano(env, tmp_path_factory):
    "A GPT-2-vocabulary run of a shape no preset has: (run folder, what the command printed)."
    out = tmp_path_factory.mktemp("runs") / "nano"
    return out, train(env, [*NANO, "--out", str(out)]).stdout


def generated(argv, stdin=""):
    shown = io.StringIO()
    rc = generate_main(argv, stdin=io.StringIO(stdin), stdout=shown)
    return rc, shown.getvalue()


def test_any_shape_and_the_precision_chosen_are_recorded(nano):
    out, _ = nano
    assert json.loads((out / "config.json").read_text())["precision"] == ("bf16" if bf16_native("cpu") else "fp32")
    hf = json.loads((out / "final" / "config.json").read_text())
    assert (hf["n_layer"], hf["n_head"], hf["n_embd"], hf["n_positions"], hf["n_ctx"]) == (2, 2, 64, 32, 32)


def test_a_run_ends_with_a_summary(nano):
    out, printed = nano
    summary = json.loads((out / "run.json").read_text())
    assert summary["steps"] == 6 and summary["final_val_loss"] is not None and summary["mfu"] > 0
    assert f"done: 6 steps, {summary['tokens_seen']:,} tokens on 1 process" in printed
    assert f"{summary['final_val_loss']:.3f} (validation)" in printed
    assert f"llm_scratch_generate --model {out / 'final'}" in printed


def test_final_is_a_hugging_face_folder_that_generates_our_tokens(nano):
    transformers = pytest.importorskip("transformers")
    out, _ = nano
    rc, ours = generated(["--model", str(out), "--temperature", "0", "--max-new-tokens", "24", "I had always"])
    assert rc == 0
    pipe = transformers.pipeline("text-generation", model=str(out / "final"), device="cpu")
    theirs = pipe("I had always", max_new_tokens=24, do_sample=False)[0]["generated_text"]
    assert ours == theirs + "\n"


def test_the_prompt_comes_from_an_argument_a_file_or_stdin(nano, tmp_path):
    out, _ = nano
    greedy = ["--model", str(out), "--temperature", "0", "--max-new-tokens", "8"]
    (tmp_path / "prompt.txt").write_text("I had always")
    results = [generated([*greedy, "I had always"]), generated([*greedy, "--file", str(tmp_path / "prompt.txt")]),
               generated(greedy, stdin="I had always"), generated([*greedy, "-"], stdin="I had always")]
    assert all(r == results[0] for r in results) and results[0][1].startswith("I had always")
    sampled = [generated(["--model", str(out), "--max-new-tokens", "8", "--seed", str(s), "I"])[1] for s in (1, 1, 2)]
    assert sampled[0] == sampled[1]  # the same seed, the same text


def test_generate_errors_say_what_to_do(nano, tmp_path, capsys):
    out, _ = nano
    for argv, message in [(["--model", str(tmp_path / "missing"), "hi"], "not a GPT-2 name"),
                          (["--model", str(out), "--temperature", "-1", "hi"], "temperature"),
                          (["--model", str(out), ""], "the prompt is empty"),
                          (["--model", str(out), "--chat"], "has no chat template")]:
        with pytest.raises(SystemExit) as e: generated(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_character_model_streams_its_characters(env, tmp_path):
    out = tmp_path / "chars"
    train(env, [*NANO, "--tokenizer", "char", "--max-steps", "2", "--out", str(out)])
    assert (out / "final" / "llm_scratch_tokenizer.json").is_file() and not (out / "final" / "tokenizer.json").exists()
    rc, text = generated(["--model", str(out), "--max-new-tokens", "30", "I had"])
    assert rc == 0 and text.startswith("I had") and len(text) == len("I had") + 30 + 1  # one character per token


def test_what_accelerate_was_told_is_honoured_or_refused(env, tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no"]
    train(env, [*NANO, "--max-steps", "2", "--out", str(tmp_path / "bf16")], [*launch, "--mixed_precision", "bf16"])
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["precision"] == "bf16"
    p = train(env, [*NANO, "--out", str(tmp_path / "fp16")], [*launch, "--mixed_precision", "fp16"], check=False)
    assert p.returncode != 0 and "fp16 mixed precision" in p.stderr and not (tmp_path / "fp16").exists()
    p = train(env, [*NANO, "--precision", "fp32", "--out", str(tmp_path / "both")],
              [*launch, "--mixed_precision", "bf16"], check=False)
    assert p.returncode != 0 and "drop one of the two" in p.stderr  # (accelerate reports our exit status 2 as 1)


def test_bad_shapes_are_refused_before_anything_runs(env, tmp_path):
    for args, message in [(["--emb-dim", "100", "--n-heads", "3"], "not divisible by n_heads=3"),
                          (["--n-layers", "0"], "n_layers must be at least 1")]:
        p = train(env, ["--out", str(tmp_path / "bad"), *args], check=False)
        assert p.returncode == 2 and message in p.stderr and not (tmp_path / "bad").exists()


def test_init_continues_from_a_run_with_its_shape_and_tokenizer(env, nano, tmp_path):
    from llm_scratch.metrics import read_metrics
    first, _ = nano
    out = tmp_path / "more"
    train(env, ["--init", str(first), "--data", "the-verdict", "--max-steps", "2", "--log-every", "1", "--no-progress",
                "--out", str(out)])
    assert json.loads((out / "config.json").read_text())["init"] == str(first)
    assert json.loads((out / "final" / "config.json").read_text()) == json.loads((first / "final" / "config.json").read_text())
    (scratch, *_, ended), started = read_metrics(first), read_metrics(out)[0]
    assert abs(started["loss"] - ended["loss"]) < 0.5 < scratch["loss"] - started["loss"], (scratch, ended, started)
    p = train(env, ["--init", str(first), "--n-layers", "3", "--out", str(tmp_path / "bad")], check=False)
    assert p.returncode == 2 and "--init brings its model's shape; drop --n-layers" in p.stderr


def test_init_of_a_character_model_needs_its_characters(env, tmp_path):
    chars = tmp_path / "chars"
    train(env, [*NANO, "--tokenizer", "char", "--max-steps", "1", "--out", str(chars)])
    (tmp_path / "other.txt").write_text("xyz " * 500)
    p = train(env, ["--init", str(chars), "--data", str(tmp_path / "other.txt"), "--out", str(tmp_path / "o")],
              check=False)
    assert p.returncode == 2 and "a character model continues only on text with its own characters" in p.stderr


def test_report_to_tensorboard_logs_what_metrics_jsonl_holds(env, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from llm_scratch.metrics import read_metrics
    out = tmp_path / "tb"
    train(env, [*NANO, "--max-steps", "3", "--report-to", "tensorboard", "--out", str(out)])
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    rows = read_metrics(out)
    assert {e.step: e.value for e in events.Scalars("loss")} == pytest.approx({r["step"]: r["loss"] for r in rows})
    assert [e.step for e in events.Scalars("val_loss")] == [r["step"] for r in rows if "val_loss" in r]


def test_a_tracker_that_is_not_installed_is_refused_at_once(env, tmp_path):
    import importlib.util
    missing = next((t for t in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(t) is None), None)
    if missing is None: pytest.skip("every tracker is installed here")
    p = train(env, [*NANO, "--report-to", missing, "--out", str(tmp_path / "t")], check=False)
    assert p.returncode == 2 and f"pip install {missing}" in p.stderr and not (tmp_path / "t").exists()


def test_shape_options_in_a_toml_file(tmp_path):
    from llm_scratch.train import model_config, parse_args
    (tmp_path / "nano.toml").write_text('tokenizer = "char"\nn-layers = 4\nn_heads = 4\nemb-dim = 128\n'
                                        'context-length = 64\nqkv-bias = false\n')
    shape = model_config(parse_args(["--config", str(tmp_path / "nano.toml"), "--n-layers", "6"]), 65)
    assert (shape.n_layers, shape.n_heads, shape.emb_dim, shape.context_length, shape.qkv_bias) == (6, 4, 128, 64, False)
    (tmp_path / "bad.toml").write_text("n-heads = 5\nemb-dim = 128\n")
    with pytest.raises(SystemExit): parse_args(["--config", str(tmp_path / "bad.toml")])


def test_an_fsdp_accelerate_config_trains_with_strategy_fsdp(env, tmp_path):
    from llm_scratch.distributed import free_port
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(free_port())]
    train(env, [*NANO, "--max-steps", "2", "--out", str(tmp_path / "f")], launch)
    assert json.loads((tmp_path / "f" / "config.json").read_text())["strategy"] == "fsdp"
    summary = json.loads((tmp_path / "f" / "run.json").read_text())
    assert [r["parameters"] / summary["parameters"] for r in summary["ranks"]] == pytest.approx([0.5, 0.5], abs=0.02)
    p = train(env, [*NANO, "--strategy", "ddp", "--out", str(tmp_path / "d")], launch, check=False)
    assert p.returncode != 0 and "accelerate is configured for FSDP but --strategy is ddp" in p.stderr


def test_fine_tuning_starts_from_a_pretraining_run_folder(env, nano, tmp_path):
    out, _ = nano
    p = subprocess.run([sys.executable, "-m", "llm_scratch.finetune", "classify", "--init", str(out), "--limit", "64",
                        "--epochs", "1", "--batch-size", "8", "--eval-every", "0", "--no-progress",
                        "--out", str(tmp_path / "spam")], env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads((tmp_path / "spam" / "results.json").read_text())
    assert results["parameters"] > 0 and results["max_length"] <= 32  # the run's model, with its context of 32
