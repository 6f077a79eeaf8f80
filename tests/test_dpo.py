"""DPO: the loss against its closed form (several betas, masked answers), its gradient's direction, ln 2 at the start,
the collate's masks, the naive and batched losses, and `llm_scratch_finetune dpo` on 2 processes against 1, resumed."""
import copy
import json
import math
import subprocess

import pytest
import torch
from hypothesis import given, settings, strategies as st

from llm_scratch.dpo import (PreferenceDataset, collate_preferences, dpo_batch, dpo_loss, dpo_loss_naive,
                             load_preferences, response_logprobs)
from llm_scratch.metrics import read_metrics
from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.text import EOT_ID, gpt2_tokenizer

from conftest import launch_command, rewound_copy


@pytest.fixture(scope="module")
def pairs():
    return PreferenceDataset(load_preferences()[:6], gpt2_tokenizer())


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    reference = GPTModel(GPTConfig.from_preset("tiny", drop_rate=0.0)).eval()
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        for p in policy.parameters(): p.add_(0.02 * torch.randn_like(p))
    return policy, reference


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(*[st.floats(-200, 0)] * 4), min_size=1, max_size=8), st.sampled_from([0.01, 0.1, 0.5, 2.0]))
def test_the_loss_is_the_closed_form(logps, beta):
    pc, pr, rc, rr = (torch.tensor(col, dtype=torch.float64) for col in zip(*logps))
    losses, r_chosen, r_rejected = dpo_loss(pc, pr, rc, rr, beta)
    for i, (a, b, c, d) in enumerate(logps):
        z = beta * ((a - c) - (b - d))
        closed = math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))  # log(1 + e^-z), stably
        assert math.isclose(losses[i].item(), closed, rel_tol=1e-9, abs_tol=1e-12)
        assert math.isclose(r_chosen[i].item(), beta * (a - c), abs_tol=1e-9)
        assert math.isclose(r_rejected[i].item(), beta * (b - d), abs_tol=1e-9)


def test_the_gradient_raises_chosen_and_lowers_rejected(pairs, models):
    policy, reference = models
    x, y = collate_preferences([pairs[i] for i in range(len(pairs))])
    b = x.shape[0] // 2
    logp = response_logprobs(policy, x, y)
    held = logp.detach().requires_grad_()
    with torch.no_grad(): ref = response_logprobs(reference, x, y)
    dpo_loss(held[:b], held[b:], ref[:b], ref[b:])[0].sum().backward()
    assert (held.grad[:b] < 0).all() and (held.grad[b:] > 0).all()
    # one small step of plain gradient descent on the policy's weights raises every chosen-minus-rejected gap... on average
    policy = copy.deepcopy(policy)
    dpo_batch(policy, reference, x, y)[0].sum().backward()
    with torch.no_grad():
        for p in policy.parameters(): p -= 1e-2 * p.grad
        after = response_logprobs(policy, x, y)
    assert ((after[:b] - after[b:]) - (logp[:b] - logp[b:]).detach()).mean() > 0


def test_policy_equal_to_reference_gives_ln_2(pairs, models):
    _, reference = models
    x, y = collate_preferences([pairs[i] for i in range(len(pairs))])
    losses, rc, rr = dpo_batch(reference, reference, x, y, beta=0.3)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), atol=1e-7)
    assert (rc == 0).all() and (rr == 0).all()


def test_the_collate_counts_exactly_the_answers(pairs):
    x, y = collate_preferences([pairs[i] for i in range(len(pairs))], allowed_max_length=None)
    rows = [(c, n) for c, _, n in pairs.items] + [(r, n) for _, r, n in pairs.items]
    assert x.shape == (2 * len(pairs), max(len(ids) for ids, _ in rows))
    for row, (ids, n_prompt) in enumerate(rows):
        counted = (y[row] != -100).nonzero().flatten().tolist()
        assert counted == list(range(n_prompt - 1, len(ids)))  # not the prompt, not the padding; the end-of-text, once
        assert y[row, n_prompt - 1:len(ids) - 1].tolist() == ids[n_prompt:] and y[row, len(ids) - 1] == EOT_ID
    x8, y8 = collate_preferences([pairs[i] for i in range(len(pairs))], allowed_max_length=8)
    assert x8.shape[1] == 8 and torch.equal(y8, y[:, :8])


def test_naive_and_batched_losses_agree_and_masking_is_the_manual_sum(pairs, models):
    policy, reference = models
    items = [pairs[i] for i in range(len(pairs))]
    x, y = collate_preferences(items)
    naive = torch.stack([dpo_loss_naive(policy, reference, it, beta=0.2) for it in items])
    batched = dpo_batch(policy, reference, x, y, beta=0.2)[0]
    assert torch.allclose(naive, batched, atol=1e-5), (naive, batched)
    with torch.no_grad():
        logp = torch.log_softmax(policy(x), -1)
        manual = torch.stack([sum(logp[r, t, y[r, t]] for t in range(y.shape[1]) if y[r, t] != -100)
                              for r in range(x.shape[0])])
        assert torch.allclose(response_logprobs(policy, x, y), manual, atol=1e-4)


BASE = ["dpo", "--init", "scratch:tiny", "--limit", "24", "--max-steps", "4", "--log-every", "1", "--eval-every", "2",
        "--save-every", "2", "--lr", "1e-3", "--generate", "0", "--max-length", "96", "--no-progress", "--precision", "fp32"]


def finetune(env, args, nproc=1):
    p = subprocess.run(launch_command("llm_scratch.finetune", args, nproc, "accelerate"), env=env, capture_output=True,
                       text=True, timeout=300)
    if p.returncode != 0: raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def test_two_processes_take_the_steps_of_one_and_resume_exactly(env, tmp_path):
    finetune(env, BASE + ["--batch-size", "4", "--out", str(tmp_path / "one")])
    finetune(env, BASE + ["--batch-size", "2", "--out", str(tmp_path / "two")], nproc=2)
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        for k in ("loss", "val_loss", "val_accuracy", "val_margin"):
            if k in ra: assert abs(ra[k] - rb[k]) < 1e-5, (k, ra, rb)
    assert a[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the first step: policy = reference
    res = json.loads((tmp_path / "two" / "results.json").read_text())
    assert res["before"]["val_loss"] == pytest.approx(math.log(2)) and res["before"]["val_accuracy"] == 0.5
    assert res["after"]["val_loss"] < math.log(2) and res["world_size"] == 2
    # resumed at step 2 on 2 processes: steps 3 and 4 bit for bit
    again = rewound_copy(tmp_path / "two", tmp_path / "again", 2)
    finetune(env, BASE + ["--batch-size", "2", "--out", str(again), "--resume"], nproc=2)
    keys = ("step", "loss", "val_loss", "val_accuracy", "val_margin", "val_prefers_chosen")
    assert [{k: r.get(k) for k in keys} for r in read_metrics(again)] == [{k: r.get(k) for k in keys} for r in b]
