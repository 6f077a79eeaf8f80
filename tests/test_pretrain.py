"""Pretraining pieces: exact resume from a checkpoint, atomic writes, safe loading, the schedule."""
import math
import pickle

import pytest
import torch

from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.pretrain import (atomic_torch_save, calc_loss_batch, load_checkpoint, save_checkpoint,
                                  train_val_split, warmup_cosine)


def _steps(model, opt, batches):
    out = []
    for x, y in batches:
        loss = calc_loss_batch(x, y, model)
        opt.zero_grad(); loss.backward(); opt.step()
        out.append(loss.item())
    return out


def test_resume_reproduces_an_uninterrupted_run_with_dropout(tmp_path):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.2)
    batches = [(torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))) for _ in range(6)]
    m = GPTModel(cfg).train(); o = torch.optim.AdamW(m.parameters(), lr=1e-3)
    _steps(m, o, batches[:3])
    save_checkpoint(tmp_path / "c.pt", m, o, step=3, note="hello")
    straight = _steps(m, o, batches[3:])
    torch.manual_seed(999)  # resuming must not depend on the state the new process happens to be in
    m2 = GPTModel(cfg).train(); o2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    ck = load_checkpoint(tmp_path / "c.pt", m2, o2)
    assert ck["step"] == 3 and ck["extra"] == {"note": "hello"}
    assert _steps(m2, o2, batches[3:]) == straight
    for a, b in zip(m.parameters(), m2.parameters()): assert torch.equal(a, b)


def test_a_failed_save_leaves_the_old_checkpoint_and_no_temp_files(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    atomic_torch_save({"x": torch.ones(3)}, path)
    real_save = torch.save

    def dies_halfway(obj, f, *a, **k):
        with open(f, "wb") as fh: fh.write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"x": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))


def test_loading_refuses_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self): return (print, ("this ran",))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f: pickle.dump({"model": Evil()}, f)
    m = GPTModel(GPTConfig(vocab_size=8, context_length=4, emb_dim=8, n_heads=2, n_layers=1))
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(path, m)


def test_warmup_cosine_shape():
    lrs = [warmup_cosine(s, 1.0, 100, 10, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[110] == pytest.approx(0.1)


def test_train_val_split():
    assert train_val_split("abcdefghij", 0.8) == ("abcdefgh", "ij")
    with pytest.raises(ValueError, match="between 0 and 1"):
        train_val_split("abc", 1.5)
