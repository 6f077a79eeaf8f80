"""Tokenizers and data loading of nbs/01_text.ipynb: parity with tiktoken, round trips, the two BPE trainers, windows."""
import os
from collections import Counter
from pathlib import Path

os.environ.setdefault("LLM_SCRATCH_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data"))

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llm_scratch.data import fetch
from llm_scratch.text import (GPT2_PATTERN, BPETokenizer, GPTDataset, SimpleTokenizer, count_words,
                              create_dataloader, gpt2_tokenizer, train_bpe, train_bpe_naive)

EOT = "<|endoftext|>"
SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def ref():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def gpt2():
    return BPETokenizer.from_gpt2()


@pytest.fixture(scope="module")
def verdict():
    return fetch("the-verdict").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare():
    return fetch("tinyshakespeare").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bard(shakespeare):
    return BPETokenizer.train(shakespeare, 1000)


# --- the reference itself ---------------------------------------------------------------------

def test_reference_known_ids(ref):
    assert ref.encode("Hello, world. Is this-- a test?") == [15496, 11, 995, 13, 1148, 428, 438, 257, 1332, 30]
    assert ref.n_vocab == 50257 and ref.eot_token == 50256


def test_reference_uses_tiktokens_own_pattern(ref):
    # tiktoken spells GPT-2's regex differently (possessive quantifiers); the parity tests below show
    # that our GPT2_PATTERN, the original spelling, cuts text the same way
    from tiktoken_ext.openai_public import r50k_pat_str
    assert ref._pat_str == r50k_pat_str


# --- GPT-2 parity with tiktoken -----------------------------------------------------------------

FIXED = {
    "empty": "",
    "spaces": "a b  c   d    e" + " " * 40 + "f " + " " * 7,
    "only spaces": " " * 33,
    "newlines": "one\ntwo\n\nthree\n\n\n\nfour\r\nfive\r\n\r\n\n",
    "tabs": "\tx\t\ty\t \t z\t\t\t",
    "mixed whitespace": " \n \t\n  \u00a0 \u3000x\u2028y \x0b\x0c",
    "digits": "0 1 12 123 1234 12345 123456 3.14159 1,000,000 2024-12-01 0x1F 1e-9",
    "code": 'def f(x, *args, **kw):\n    """Doc."""\n    return {k: v for k, v in kw.items() if v != x}  # note\n',
    "contractions": "I'll we've they're it's he'd I'm DON'T She'S 'quoted' ''",
    "emoji": "🙂 👍🏽 👨‍👩‍👧 🇫🇷 ❤️🔥 x🙂y",
    "cjk": "日本語のテキスト、中文文本和한국어 텍스트。",
    "scripts": "Ελληνικά Русский العربية עברית हिन्दी ไทย naïve café Zürich",
    "punctuation": "!!! ??? ... --- ((( ))) <<>> [[]] {{}} @#$%^&*_+=~`|\\/",
    "eot as text": f"a{EOT}b {EOT}",
    "almost eot": "<|endoftext| <|endoftext> |endoftext|> <|EndOfText|>",
}


@pytest.mark.parametrize("name", list(FIXED))
def test_parity_fixed(name, ref, gpt2):
    text = FIXED[name]
    assert gpt2.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())
    assert gpt2.encode(text, allowed_special="all") == ref.encode(text, allowed_special="all")
    assert gpt2.decode(gpt2.encode(text, allowed_special="all")) == text


@pytest.mark.parametrize("name", ["the-verdict", "tinyshakespeare"])
def test_parity_whole_files(name, ref, gpt2):
    text = fetch(name).read_text(encoding="utf-8")
    ours = gpt2.encode(text)
    assert ours == ref.encode(text)
    assert gpt2.decode(ours) == text


def test_parity_lone_surrogates(ref, gpt2):
    for text in ["\ud800", "a\udfffb", "\ud83d\ude42", "x\ud83d"]:  # lone halves, and a pair as two code units
        assert gpt2.encode(text) == ref.encode(text)


def test_decode_partial_utf8_like_tiktoken(ref, gpt2):
    ids = ref.encode("🙂日本")
    for i in range(len(ids) + 1):
        assert gpt2.decode(ids[:i]) == ref.decode(ids[:i])


@settings(SETTINGS, max_examples=300)
@given(st.text(max_size=200))
def test_parity_any_unicode(ref, gpt2, text):
    ids = gpt2.encode(text, disallowed_special=())
    assert ids == ref.encode(text, disallowed_special=())
    assert gpt2.decode(ids) == text


WS_ALPHABET = st.sampled_from(list(" \t\n\r\x0b\x0c\u00a0\u2003ab1'!é日🙂"))


@SETTINGS
@given(st.text(WS_ALPHABET, max_size=60))
def test_parity_whitespace_heavy(ref, gpt2, text):
    assert gpt2.encode(text) == ref.encode(text)


@SETTINGS
@given(st.lists(st.text(max_size=30), max_size=5))
def test_parity_with_special_tokens(ref, gpt2, docs):
    text = EOT.join(docs)
    ids = gpt2.encode(text, allowed_special={EOT})
    assert ids == ref.encode(text, allowed_special={EOT})
    assert ids.count(50256) == max(len(docs) - 1, 0) + sum(d.count(EOT) for d in docs)
    assert gpt2.decode(ids) == text


# --- special tokens ---------------------------------------------------------------------------

def test_disallowed_special_raises(ref, gpt2, bard):
    for tok in (ref, gpt2, bard):
        with pytest.raises(ValueError, match="allowed_special"):
            tok.encode(f"hello {EOT} world")
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2.encode(EOT, allowed_special=set())
    assert gpt2.encode(EOT, allowed_special={EOT}) == [50256]
    assert gpt2.encode(EOT, allowed_special="all") == [50256]
    assert gpt2.encode(EOT, disallowed_special=()) == ref.encode(EOT, disallowed_special=()) == [27, 91, 437, 1659, 5239, 91, 29]
    assert bard.encode(f"a{EOT}", allowed_special="all")[-1] == bard.eot_token == 999
    assert gpt2.encode(f"a{EOT}", allowed_special=EOT) == [64, 50256]  # a string is one token, not its characters
    with pytest.raises(ValueError, match="allowed_special"):
        gpt2.encode(f"a{EOT}", allowed_special={"<|"})


def test_trained_with_two_specials(verdict):
    assert BPETokenizer.train(verdict, 300, special_tokens="<|pad|>").special_tokens == {"<|pad|>": 299}
    tok = BPETokenizer.train(verdict, 300, special_tokens=(EOT, "<|pad|>"))
    assert tok.special_tokens == {EOT: 298, "<|pad|>": 299} and tok.n_vocab == 300
    ids = tok.encode(f"x<|pad|>y{EOT}", allowed_special={"<|pad|>"}, disallowed_special=())
    assert 299 in ids and 298 not in ids
    with pytest.raises(ValueError, match="<|pad|>"):
        tok.encode("x<|pad|>", allowed_special={EOT})


# --- round trips ------------------------------------------------------------------------------

@SETTINGS
@given(st.text(max_size=300))
def test_roundtrip_trained(bard, text):
    ids = bard.encode(text, disallowed_special=())
    assert all(0 <= i < 1000 for i in ids)
    assert bard.decode(ids) == text


def test_trained_shakespeare(bard, shakespeare):
    assert bard.n_vocab == 1000 and len(bard.merges) == 1000 - 256 - 1
    assert len({t for t in bard.ranks}) == 999  # bytes and ids one-to-one
    ids = bard.encode(shakespeare)
    assert bard.decode(ids) == shakespeare
    assert len(ids) < len(shakespeare.encode()) / 2  # it compresses


def test_training_is_fast(shakespeare):
    import time
    t0 = time.perf_counter()
    BPETokenizer.train(shakespeare, 1000)
    assert time.perf_counter() - t0 < 20  # about 1 s here; the naive trainer takes about 17 s


# --- the two trainers agree -------------------------------------------------------------------

def test_trainers_agree_on_verdict(verdict):
    words = count_words(verdict)
    assert train_bpe(words, 600) == train_bpe_naive(words, 600)


@SETTINGS
@given(st.dictionaries(st.binary(min_size=1, max_size=12).map(lambda b: bytes(97 + x % 3 for x in b)),
                       st.integers(1, 9), max_size=10),
       st.integers(256, 320))
def test_trainers_agree_random(words, vocab_size):
    fast = train_bpe(words, vocab_size)
    assert fast == train_bpe_naive(words, vocab_size)
    vocab, merges = fast
    assert len(set(vocab)) == len(vocab)
    assert all(vocab[new] == vocab[a] + vocab[b] for a, b, new in merges)


def test_trainers_agree_on_ties():
    words = Counter({b"abab": 1, b"cdcd": 1, b"aaaa": 2, b"aaa": 1})
    assert train_bpe(words, 270) == train_bpe_naive(words, 270)
    vocab, merges = train_bpe(words, 260)
    # "aa" is the most frequent pair (3 in each "aaaa", 2 in "aaa": 8); then "ab", "cd" and "aa aa" tie
    # at 2 and the smallest ids win, in order
    assert vocab[256:] == [b"aa", b"ab", b"cd", b"aaaa"]


# --- bad input --------------------------------------------------------------------------------

def test_train_bad_vocab_size(verdict):
    with pytest.raises(ValueError, match="vocab_size >= 257"):
        BPETokenizer.train(verdict, 100)
    with pytest.raises(ValueError, match="vocab_size >= 258"):
        BPETokenizer.train(verdict, 257, special_tokens=(EOT, "<|pad|>"))
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(verdict, 300.0)
    with pytest.raises(ValueError, match="empty"):
        BPETokenizer.train(verdict, 300, special_tokens=("",))
    assert BPETokenizer.train(verdict, 256, special_tokens=()).n_vocab == 256


def test_train_runs_out_of_pairs():
    with pytest.warns(UserWarning, match="ran out of pairs"):
        tok = BPETokenizer.train("aaab", 1000)
    assert tok.n_vocab == 260 and tok.decode(tok.encode("aaab")) == "aaab"


def test_decode_unknown_id(gpt2):
    with pytest.raises(ValueError, match="not in this vocabulary"):
        gpt2.decode([50257])


def test_from_gpt2_checks_files(tmp_path):
    folder = fetch("gpt2-vocab")
    with pytest.raises(ValueError, match="pass both"):
        BPETokenizer.from_gpt2(folder / "encoder.json")
    lines = (folder / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    lines[1], lines[2] = lines[2], lines[1]  # swap the first two merges
    bad = tmp_path / "vocab.bpe"
    bad.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match="does not match"):
        BPETokenizer.from_gpt2(folder / "encoder.json", bad)
    tok = BPETokenizer.from_gpt2(folder / "encoder.json", folder / "vocab.bpe")
    assert tok.encode("Hello") == [15496]


# --- the word tokenizer -----------------------------------------------------------------------

def test_simple_tokenizer(verdict):
    tok = SimpleTokenizer.from_text(verdict)
    ids = tok.encode(f"Hello, Jack. {EOT} The end")
    assert tok.decode(ids) == f"<|unk|>, Jack. {EOT} The end"
    assert tok.str_to_int["<|unk|>"] == len(tok.str_to_int) - 1
    with pytest.raises(ValueError, match="from_text"):
        SimpleTokenizer({"a": 0})


# --- windows and batches ----------------------------------------------------------------------

@SETTINGS
@given(st.integers(2, 60), st.integers(1, 12), st.integers(1, 12))
def test_windows(n, context_length, stride):
    ids = list(range(1000, 1000 + n))
    if n < context_length + 1:
        with pytest.raises(ValueError, match=f"has {n} tokens, but one window of context_length={context_length} "
                                             f"needs {context_length + 1}"):
            GPTDataset(ids, context_length=context_length, stride=stride)
        return
    ds = GPTDataset(ids, context_length=context_length, stride=stride)
    expected = [(ids[i:i + context_length], ids[i + 1:i + context_length + 1])
                for i in range(0, n - context_length, stride)]
    assert len(ds) == len(expected)
    for (x, y), (ex, ey) in zip((ds[i] for i in range(len(ds))), expected):
        assert x.dtype == y.dtype == torch.long
        assert x.tolist() == ex and y.tolist() == ey
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_dataset_from_text(ref, verdict):
    ds = GPTDataset(verdict + EOT + verdict, context_length=16, stride=16)
    ids = ref.encode(verdict + EOT + verdict, allowed_special="all")
    assert ds.ids.tolist() == ids and 50256 in ids
    x, y = ds[3]
    assert x.tolist() == ids[48:64] and y.tolist() == ids[49:65]
    x[0] = -1  # items are copies, not views of the dataset
    assert ds[3][0][0] == ids[48]


def test_dataset_too_short():
    with pytest.raises(ValueError, match="has 3 tokens, but one window of context_length=256 needs 257"):
        GPTDataset("Too short.")
    with pytest.raises(ValueError, match="at least 1"):
        GPTDataset(list(range(10)), context_length=4, stride=0)


def test_dataloader(verdict):
    dl = create_dataloader(verdict, batch_size=4, context_length=32, stride=32, seed=0)
    batches = list(dl)
    n_windows = (5145 - 32 - 1) // 32 + 1
    assert len(batches) == len(dl) == n_windows // 4  # drop_last
    for x, y in batches:
        assert x.shape == y.shape == (4, 32)
        assert torch.equal(x[:, 1:], y[:, :-1])
    again = list(create_dataloader(verdict, batch_size=4, context_length=32, stride=32, seed=0))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    plain = next(iter(create_dataloader(verdict, batch_size=2, context_length=8, stride=8, shuffle=False)))[0]
    assert plain[1].tolist() == gpt2_tokenizer().encode(verdict)[8:16]


def test_dataloader_workers(verdict):
    dl = create_dataloader(verdict, batch_size=8, context_length=64, stride=64, shuffle=False, num_workers=2)
    one = torch.cat([x for x, _ in dl])
    assert torch.equal(one, torch.cat([x for x, _ in create_dataloader(verdict, batch_size=8, context_length=64,
                                                                       stride=64, shuffle=False)]))


def test_dataloader_no_batches_is_an_error(verdict):
    with pytest.raises(ValueError, match="drop_last=False"):
        create_dataloader(verdict, batch_size=64, context_length=256, stride=256)
    assert len(create_dataloader(verdict, batch_size=64, context_length=256, stride=256, drop_last=False)) == 1


def test_dataloader_other_tokenizer(bard, shakespeare):
    dl = create_dataloader(shakespeare[:5000], batch_size=2, context_length=16, tokenizer=bard, shuffle=False)
    x, y = next(iter(dl))
    assert x[0].tolist() == bard.encode(shakespeare[:5000])[:16]


def test_a_long_run_of_one_letter_encodes_like_tiktoken_and_fast(gpt2, ref):
    import time
    for text in ["a" * 100_000, " " + "=" * 60_000, "ab" * 40_000]:
        t0 = time.perf_counter()
        ids = gpt2.encode_ordinary(text)
        took = time.perf_counter() - t0
        assert ids == ref.encode_ordinary(text)
        assert took < 5, f"{took:.1f} s for {len(text):,} characters"  # the quadratic merge took about 6 minutes


@SETTINGS
@given(st.binary(max_size=40) | st.text(alphabet="ab =\u00e9\u4e2d", max_size=60).map(lambda s: s.encode()))
def test_the_heap_merge_matches_the_naive_merge(gpt2, piece):
    from llm_scratch.text import bpe_encode_piece, bpe_encode_piece_fast
    assert bpe_encode_piece_fast(piece, gpt2.ranks) == bpe_encode_piece(piece, gpt2.ranks)
