"""Classification: robust SMS parsing, balance/split, padding, padding-invariant logits, parity with HF, training."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from llm_scratch.classify import (LABELS, SpamDataset, balance, calc_accuracy, classification_logits, classify,
                                  freeze_except_top, last_position_logits, load_sms_spam, make_classifier, pad_ids,
                                  parse_sms_line, set_dropout, spam_loaders, split, train_classifier, trainable_params)
from llm_scratch.model import GPTConfig, GPTModel


def tiny(seed=0, vocab=97, ctx=48, **kw):
    torch.manual_seed(seed)
    cfg = GPTConfig(vocab_size=vocab, context_length=ctx, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, **kw)
    return make_classifier(GPTModel(cfg)).eval()


class CharTok:
    "A tokenizer stub: one id per character (mod 90), ids 90+ never used, so 96 can be the pad id."
    def encode_ordinary(self, text): return [ord(c) % 90 for c in text]


# ---------------------------------------------------------------- reading the file
def test_parse_keeps_quotes_tabs_and_trailing_spaces():
    assert parse_sms_line('ham\t"hi" she said\tthen left  \r\n') == ('"hi" she said\tthen left  ', "ham")
    assert parse_sms_line("spam\t\"unclosed quote") == ('"unclosed quote', "spam")


@pytest.mark.parametrize("line,why", [("ham", "one tab"), ("eggs\tnice", "label"), ("ham\t", "line 3"),
                                      ("ham see you", "one tab"), ("Ham\tcapital", "label")])
def test_parse_rejects_malformed_rows(line, why):
    with pytest.raises(ValueError, match=why):
        parse_sms_line(line, 3)


def test_load_reads_line_by_line(tmp_path):
    f = tmp_path / "sms.tsv"
    f.write_text('ham\t"quoted start\nspam\tWIN\ttabs\x0bvertical tab\n\nham\tlast, no newline', encoding="utf-8")
    assert load_sms_spam(f) == [('"quoted start', "ham"), ("WIN\ttabs\x0bvertical tab", "spam"),
                                ("last, no newline", "ham")]
    f.write_text("ham\tok\nham\tfine\nspam no tab here\n")
    with pytest.raises(ValueError, match="line 3"):
        load_sms_spam(f)


def test_load_other_labels(tmp_path):
    f = tmp_path / "x.tsv"
    f.write_text("pos\tgood\nneg\tbad\n")
    assert load_sms_spam(f, labels=("neg", "pos")) == [("good", "pos"), ("bad", "neg")]


def test_the_real_file():
    msgs = load_sms_spam()
    assert len(msgs) == 5574
    assert sum(label == "spam" for _, label in msgs) == 747
    assert all(text and "\n" not in text for text, _ in msgs)


# ---------------------------------------------------------------- balance and split
@given(st.lists(st.tuples(st.text(min_size=1, max_size=5), st.sampled_from("abc")), min_size=1, max_size=60),
       st.integers(0, 10))
@settings(max_examples=60, deadline=None)
def test_balance_property(pairs, seed):
    out = balance(pairs, seed)
    counts = {label: sum(p[1] == label for p in out) for label in {p[1] for p in pairs}}
    assert len(set(counts.values())) == 1
    assert min(counts.values()) == min(sum(p[1] == label for p in pairs) for label in counts)
    assert balance(pairs, seed) == out
    remaining = list(pairs)  # out is a sub-multiset of pairs, in file order within each class
    for p in out: remaining.remove(p)


def test_balance_empty():
    with pytest.raises(ValueError, match="no messages"):
        balance([])


@given(st.integers(1, 3000), st.floats(0.05, 0.9), st.floats(0.0, 0.5), st.integers(0, 5))
@settings(max_examples=80, deadline=None)
def test_split_property(n, tf, vf, seed):
    if tf + vf >= 1: return
    a, b, c = split(range(n), tf, vf, seed)
    assert len(a) == int(n * tf) and len(b) == int(n * vf)
    assert sorted(a + b + c) == list(range(n))
    assert split(range(n), tf, vf, seed) == (a, b, c)


@pytest.mark.parametrize("tf,vf", [(0, 0.1), (1.0, 0), (0.7, 0.3), (0.5, -0.1)])
def test_split_rejects_bad_fractions(tf, vf):
    with pytest.raises(ValueError, match="train_frac"):
        split(range(10), tf, vf)


# ---------------------------------------------------------------- padding
def test_pad_ids_cuts_and_pads():
    ids, n = pad_ids([[1, 2, 3], [4], [5, 6, 7, 8, 9]], max_length=4, pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 0], [4, 0, 0, 0], [5, 6, 7, 8]] and n.tolist() == [3, 1, 4]
    ids, n = pad_ids([[1, 2], [3]], pad_id=9)
    assert ids.tolist() == [[1, 2], [3, 9]]
    for bad, msg in (([[1], []], "no tokens"), ([], "no sequences")):
        with pytest.raises(ValueError, match=msg): pad_ids(bad)
    with pytest.raises(ValueError, match="at least 1"): pad_ids([[1]], max_length=0)


def test_dataset_and_loaders():
    pairs = [("hello there", "ham"), ("WIN NOW", "spam"), ("ok", "ham")] * 5
    ds = SpamDataset(pairs, CharTok(), pad_id=96)
    assert ds.max_length == 11 and ds[1][1].item() == 7 and ds[1][2].item() == 1
    assert (ds.ids[2, 2:] == 96).all()
    tr, va, te = spam_loaders(pairs[:9], pairs[9:12], pairs[12:] + [("a much longer message", "spam")],
                              CharTok(), batch_size=2, pad_id=96)
    assert te.dataset.max_length == 11 and te.dataset.lengths.max() == 11  # cut to the training width
    assert len(tr) == 4  # drop_last
    with pytest.raises(ValueError, match="labels="):
        SpamDataset([("x", "maybe")], CharTok())


def test_gpt2_dataset_never_contains_the_pad_id_inside_a_message():
    ds = SpamDataset([("see <|endoftext|> here", "ham"), ("hi", "spam")], max_length=12)
    for ids, n, _ in ds: assert 50256 not in ids[:n].tolist()


# ---------------------------------------------------------------- the padding-invariance property
@given(st.lists(st.integers(1, 20), min_size=1, max_size=5), st.integers(0, 27), st.integers(0, 3))
@settings(max_examples=40, deadline=None)
def test_logits_do_not_depend_on_padding_or_batch(lengths, extra, seed):
    model = tiny(seed)
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(0, 96, (n,), generator=g).tolist() for n in lengths]
    ids, n = pad_ids(seqs, max(lengths) + extra, pad_id=96)
    with torch.no_grad():
        batch = classification_logits(model, ids, n)
        alone = torch.cat([model(torch.tensor([s]))[:, -1] for s in seqs])
        reversed_batch = classification_logits(model, ids.flip(0), n.flip(0)).flip(0)
        mask = classification_logits(model, ids, attention_mask=(torch.arange(ids.shape[1]) < n[:, None]).int())
    torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reversed_batch, batch, atol=1e-5, rtol=1e-5)
    assert torch.equal(mask, batch)


def test_naive_reading_depends_on_padding():
    model = tiny(1)
    seq = torch.arange(10)[None]
    with torch.no_grad():
        a = last_position_logits(model, seq)
        b = last_position_logits(model, torch.cat([seq, torch.full((1, 20), 96)], 1))
    assert (a - b).abs().max() > 1e-3


def test_classification_logits_errors():
    model, ids = tiny(), torch.zeros(2, 5, dtype=torch.long)
    for bad in ([0, 3], [6, 1], [1, 2, 3]):
        with pytest.raises(ValueError, match="lengths must be"): classification_logits(model, ids, torch.tensor(bad))
    with pytest.raises(ValueError, match="not both"):
        classification_logits(model, ids, torch.tensor([1, 1]), torch.ones(2, 5))
    with pytest.raises(ValueError, match="no real token"):
        classification_logits(model, ids, attention_mask=torch.tensor([[1, 1, 0, 0, 0], [0] * 5]))
    torch.testing.assert_close(classification_logits(model, ids), model(ids)[:, -1])  # no lengths: no padding


def test_matches_hugging_face_sequence_classification():
    "HF's GPT2ForSequenceClassification reads the rightmost non-pad token: the same rule, the same numbers."
    transformers = pytest.importorskip("transformers")
    from llm_scratch.weights import gpt_state_dict
    pad = 96
    hf_cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=48, num_labels=2,
                                     pad_token_id=pad, resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    torch.manual_seed(0)
    hf = transformers.GPT2ForSequenceClassification(hf_cfg).eval()
    sd = {k: v for k, v in hf.state_dict().items() if not k.startswith("score.")}
    ours = tiny(ctx=48)
    ours.load_state_dict({**gpt_state_dict(sd, ours.cfg), "out_head.weight": hf.score.weight,
                          "out_head.bias": torch.zeros(2)})
    ids, n = pad_ids([[5, 6, 7], list(range(1, 30)), [9]], 40, pad_id=pad)
    with torch.no_grad():
        theirs = hf(input_ids=ids).logits
        mine = classification_logits(ours, ids, n)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- head, freezing, training, classify
def test_make_classifier_and_freeze():
    model = tiny(vocab=97)
    assert model.out_head.out_features == 2 and model.tok_emb.weight.shape == (97, 32)
    freeze_except_top(model, 1)
    trained = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("blocks") else "")
               for n, p in model.named_parameters() if p.requires_grad}
    assert trained == {"blocks.1", "final_norm", "out_head"}
    assert trainable_params(freeze_except_top(model, 0)) == 2 * 32 + 32 * 2 + 2
    assert trainable_params(freeze_except_top(model, 2)) == sum(p.numel() for p in model.parameters()) - 97 * 32 - 48 * 32
    with pytest.raises(ValueError, match="between 0 and 2"): freeze_except_top(model, 3)


def test_set_dropout():
    torch.manual_seed(0)
    m = set_dropout(GPTModel(GPTConfig.from_preset("tiny", vocab_size=50, drop_rate=0.3)), 0.0).train()
    x = torch.randint(0, 50, (2, 9))
    assert torch.equal(m(x), m(x))


def synthetic(n, seed):
    "Class 1 iff token 7 occurs in the sequence; lengths 3..20, padded with 96."
    g = torch.Generator().manual_seed(seed)
    seqs, labels = [], []
    for i in range(n):
        s = torch.randint(10, 90, (int(torch.randint(3, 21, (1,), generator=g)),), generator=g)
        if i % 2: s[int(torch.randint(0, len(s), (1,), generator=g))] = 7
        seqs.append(s.tolist()); labels.append(i % 2)
    ids, lengths = pad_ids(seqs, 24, 96)
    return torch.utils.data.TensorDataset(ids, lengths, torch.tensor(labels))


def test_train_classifier_learns_a_separable_task():
    model = tiny(3)
    train = torch.utils.data.DataLoader(synthetic(256, 0), batch_size=16, shuffle=True,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(synthetic(64, 1), batch_size=32)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = calc_accuracy(model, val)
    log = train_classifier(model, train, val, opt, num_epochs=6, eval_every=8, eval_batches=2, verbose=False)
    assert len(log.train_accs) == 6 and log.steps == list(range(8, 97, 8)) and log.seconds > 0
    assert log.val_accs[-1] > 0.85 and log.val_accs[-1] > before + 0.2, (before, log.val_accs)
    assert log.train_losses[-1] < log.train_losses[0]


def test_classify_single_list_truncation_and_mode():
    model = tiny(4).train()
    texts = ["hello", "a rather longer message than that", "x"]
    labels = classify(texts, model, CharTok(), pad_id=96)
    assert labels == [classify(t, model, CharTok(), pad_id=96) for t in texts]
    assert set(labels) <= set(LABELS) and model.training  # classify restores training mode
    long = "y" * 100  # longer than the context of 48: cut to max_length
    assert classify(long, model, CharTok(), pad_id=96) == classify("y" * 48, model, CharTok(), pad_id=96)
    assert classify(long, model, CharTok(), max_length=5, pad_id=96) == classify("yyyyy", model, CharTok(), pad_id=96)
    assert classify(["a"], model, CharTok(), labels=("no", "yes"), pad_id=96)[0] in ("no", "yes")
