"""Instruction fine-tuning: the collate function's properties, data checks, metrics, generation, and the
Ollama judge against a local HTTP server that speaks Ollama's streaming format."""
import http.server
import json
import random
import socket
import threading
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from llm_scratch.instruct import (INSTRUCTION_KEYS, InstructionDataset, JudgeError, OllamaJudge, collate_instructions,
                                  collate_naive, evaluate_responses, exact_match, extract_response, format_prompt,
                                  format_response, generate_responses, instruction_dataloader, judge_prompt,
                                  lcs_length, lcs_naive, load_instructions, load_responses, parse_score, rouge_l,
                                  save_responses, score_responses, split_records, token_f1, validate_records)
from llm_scratch.model import GPTConfig, GPTModel
from llm_scratch.pretrain import calc_loss_batch
from llm_scratch.text import gpt2_tokenizer

PAD, IGN = 50256, -100


# --- the collate function -------------------------------------------------------------------------

@st.composite
def batches(draw):
    "A batch of (ids, n_prompt): 1-6 examples of 1-30 real tokens (never the pad id), prompts of 1..len."
    n = draw(st.integers(1, 6))
    out = []
    for _ in range(n):
        ids = draw(st.lists(st.integers(0, PAD - 1), min_size=1, max_size=30))
        out.append((ids, draw(st.integers(1, len(ids)))))
    return out


@settings(max_examples=200, deadline=None)
@given(batches(), st.booleans())
def test_collate_pads_shifts_and_keeps_one_end_of_text(batch, mask_prompt):
    x, y = collate_instructions(batch, mask_prompt=mask_prompt)
    T = max(len(ids) for ids, _ in batch)
    assert x.shape == y.shape == (len(batch), T) and x.dtype == y.dtype == torch.long
    for i, (ids, n) in enumerate(batch):
        L = len(ids)
        assert x[i, :L].tolist() == ids and (x[i, L:] == PAD).all()  # the example, then padding
        assert y[i, L - 1] == PAD  # the appended end-of-text is the target after the last token
        assert (y[i, L:] == IGN).all()  # every later padding target is ignored
        expect = ids[1:]  # the shift: target t is token t + 1
        got = y[i, :L - 1].tolist()
        if mask_prompt:
            assert got[:n - 1] == [IGN] * (n - 1)  # targets predicting prompt tokens are hidden...
            assert got[n - 1:] == expect[n - 1:]  # ...and the first kept one predicts the first response token
        else:
            assert got == expect
    assert torch.equal(x, collate_naive(batch, mask_prompt=mask_prompt)[0])
    assert torch.equal(y, collate_naive(batch, mask_prompt=mask_prompt)[1])


@settings(max_examples=100, deadline=None)
@given(batches(), st.booleans(), st.integers(1, 35))
def test_collate_truncates_like_the_naive_version(batch, mask_prompt, cut):
    x, y = collate_instructions(batch, allowed_max_length=cut, mask_prompt=mask_prompt)
    full_x, full_y = collate_instructions(batch, mask_prompt=mask_prompt)
    assert torch.equal(x, full_x[:, :cut]) and torch.equal(y, full_y[:, :cut])
    nx, ny = collate_naive(batch, allowed_max_length=cut, mask_prompt=mask_prompt)
    assert torch.equal(x, nx) and torch.equal(y, ny)


def test_collate_finds_padding_by_position_and_moves_to_device():
    # a real end-of-text token inside an example is a target like any other, and the appended one is kept too
    x, y = collate_instructions([([7, PAD, 8], 1), ([9], 1)], device="cpu")
    assert y.tolist() == [[PAD, 8, PAD], [PAD, IGN, IGN]] and x.device.type == "cpu"
    # the naive one takes the real 50256 for the first padding and hides the appended end-of-text instead
    assert collate_naive([([7, PAD, 8], 1), ([9], 1)])[1].tolist() == [[PAD, 8, IGN], [PAD, IGN, IGN]]
    x, y = collate_instructions([([1, 2], 1)], pad_id=0, ignore_index=-1)  # other pad and ignore ids
    assert x.tolist() == [[1, 2]] and y.tolist() == [[2, 0]]
    with pytest.raises(ValueError, match="empty batch"): collate_instructions([])
    with pytest.raises(ValueError, match="at least one token"): collate_instructions([([], 0), ([1], 1)])


def test_loss_ignores_padding_and_masked_prompt():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=31, context_length=16, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.0)).eval()
    batch = [([5, 6, 7, 8, 9], 3), ([10, 11], 1)]
    x, y = collate_instructions(batch, pad_id=30, mask_prompt=True)
    with torch.no_grad():
        loss = calc_loss_batch(x, y, model)  # F.cross_entropy's default ignore_index is -100
        logits = model(x)
    keep = y != IGN
    assert int(keep.sum()) == 5  # row 0 keeps 8, 9, end-of-text; row 1 keeps 11, end-of-text
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], y[keep]))


# --- data ------------------------------------------------------------------------------------------

def test_load_instructions_checks_records(tmp_path):
    records = load_instructions()
    assert len(records) == 1100 and all(set(INSTRUCTION_KEYS) <= set(r) for r in records)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    with pytest.raises(ValueError, match="record 1 has no 'output' key"): load_instructions(bad)
    bad.write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"): load_instructions(bad)
    bad.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(ValueError, match="must be a list"): load_instructions(bad)
    with pytest.raises(ValueError, match="record 0 is a str"): validate_records(["text"])
    with pytest.raises(ValueError, match="'output' must be a string"):
        validate_records([{"instruction": "a", "input": "", "output": 3}])


def test_split_is_the_books_and_shuffling_is_seeded():
    records = [{"instruction": str(i), "input": "", "output": ""} for i in range(1100)]
    tr, va, te = split_records(records)
    assert (len(tr), len(va), len(te)) == (935, 55, 110)
    assert tr == records[:935] and te == records[935:1045] and va == records[1045:]
    a, b, c = split_records(records, shuffle=True, seed=5)
    assert sorted(map(id, a + b + c)) == sorted(map(id, records))  # a partition
    assert (a, b, c) == split_records(records, shuffle=True, seed=5) and a != tr
    assert [len(s) for s in split_records(records[:7])] == [5, 2, 0]
    with pytest.raises(ValueError, match="train_frac"): split_records(records, train_frac=1.0)


def test_prompt_format_is_the_books():
    pre = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
           "request.")
    r = {"instruction": "Convert to passive voice.", "input": "The cat chased the mouse.",
         "output": "The mouse was chased by the cat."}
    assert format_prompt(r) == (f"{pre}\n\n### Instruction:\nConvert to passive voice.\n\n### Input:\n"
                                "The cat chased the mouse.")
    assert format_prompt({**r, "input": ""}) == f"{pre}\n\n### Instruction:\nConvert to passive voice."
    assert format_response(r) == "\n\n### Response:\nThe mouse was chased by the cat."


def test_dataset_marks_where_the_response_starts():
    tok = gpt2_tokenizer()
    recs = load_instructions()[:50]
    ds = InstructionDataset(recs, tok)
    for r, (ids, n) in zip(recs, ds):
        assert tok.decode(ids[:n]) == format_prompt(r) and tok.decode(ids[n:]) == format_response(r)
    loader = instruction_dataloader(recs, tok, batch_size=8, mask_prompt=True, allowed_max_length=20)
    x, y = next(iter(loader))
    assert x.shape[1] == 20 and (y == IGN).all()  # every prompt is longer than 20 tokens: nothing left to learn


# --- generation and saving -------------------------------------------------------------------------

def test_generate_responses_batched_by_length_equals_one_at_a_time():
    tok = gpt2_tokenizer()
    torch.manual_seed(1)
    model = GPTModel(GPTConfig.from_preset("tiny", emb_dim=32, n_layers=1, context_length=96, drop_rate=0.0))
    test = load_instructions()[935:975]
    by_len = {}
    for r in test: by_len.setdefault(len(tok.encode(format_prompt(r))), []).append(r)
    recs = [r for group in by_len.values() if len(group) > 1 for r in group][:7] + [test[0]]  # shared lengths
    assert len(recs) == 8
    batched = generate_responses(model, recs, tok, max_new_tokens=8, batch_size=2)
    single = [generate_responses(model, [r], tok, max_new_tokens=8)[0] for r in recs]
    assert batched == single and all(r["model_response"] == extract_response(r["model_response"]) for r in batched)
    assert [{k: r[k] for k in INSTRUCTION_KEYS} for r in batched] == recs  # the records are copied, not changed
    assert "model_response" not in recs[0]


def test_extract_response():
    assert extract_response("### Response:\nJane Austen.<|endoftext|><|endoftext|>") == "Jane Austen."
    assert extract_response("xx\n\n### Response:\n a ### Response: b \n") == "a ### Response: b"
    assert extract_response("just text<|endoftext|>### Response: later") == "just text"


def test_save_and_load_responses(tmp_path):
    recs = [{"instruction": "Say hi", "input": "", "output": "Hi.", "model_response": "Héllo"}]
    p = save_responses(tmp_path / "out.json", recs)
    assert load_responses(p) == recs and "Héllo" in p.read_text(encoding="utf-8")
    assert [f.name for f in tmp_path.iterdir()] == ["out.json"]
    with pytest.raises(ValueError, match="no 'model_response' key"):
        load_responses(save_responses(tmp_path / "out.json", [{"instruction": "a", "input": "", "output": "b"}]))


# --- metrics ---------------------------------------------------------------------------------------

def test_squad_metrics_on_known_cases():
    assert exact_match("  The Answer!", "answer") == 1.0 and exact_match("an answer", "answers") == 0.0
    assert token_f1("Jane Austen", "Jane Austen.") == 1.0
    assert token_f1("Austen", "Jane Austen") == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert token_f1("the the", "the") == 1.0  # both normalise to nothing
    assert token_f1("", "x") == 0.0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from("abcd"), max_size=8), st.lists(st.sampled_from("abcd"), max_size=8))
def test_lcs_dynamic_programming_equals_the_recursion(a, b):
    n = lcs_length(a, b)
    assert n == lcs_naive(a, b) == lcs_length(b, a) and n <= min(len(a), len(b))


def test_rouge_l_hand_computed():
    # LCS of "police killed the gunman" / "the gunman was shot by police": "the gunman", 2 words
    p, r = 2 / 4, 2 / 6
    assert rouge_l("police killed the gunman", "the gunman was shot by police") == pytest.approx(2 * p * r / (p + r))
    assert rouge_l("The gunman, police killed.", "the gunman police killed") == 1.0
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0 and rouge_l("x", "y") == 0.0


def test_evaluate_responses():
    recs = [{"instruction": "", "input": "", "output": "Jane Austen", "model_response": "Jane Austen."},
            {"instruction": "", "input": "", "output": "blue", "model_response": "red"}]
    ev = evaluate_responses(recs)
    assert ev == {"n": 2, "exact_match": 0.5, "token_f1": 0.5, "rouge_l": 0.5}
    with pytest.raises(ValueError, match="no 'answer'"): evaluate_responses(recs, key="answer")
    with pytest.raises(ValueError, match="no records"): evaluate_responses([])


# --- the judge ---------------------------------------------------------------------------------------

class FakeOllama(http.server.BaseHTTPRequestHandler):
    "Answers /api/chat like Ollama: a 404 for an unknown model, else the reply streamed as JSON lines."
    requests = []
    reply = ["8", "5"]

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "content_type": self.headers["Content-Type"], "body": body})
        if body["model"] != "llama3":
            msg = json.dumps({"error": f"model '{body['model']}' not found, try pulling it first"}).encode()
            self.send_response(404); self.send_header("Content-Length", str(len(msg))); self.end_headers()
            self.wfile.write(msg); return
        lines = [{"model": "llama3", "message": {"role": "assistant", "content": piece}, "done": False}
                 for piece in type(self).reply]
        lines.append({"model": "llama3", "message": {"role": "assistant", "content": ""}, "done": True})
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        self.send_response(200); self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Content-Length", str(len(data))); self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args): pass


@pytest.fixture
def ollama():
    FakeOllama.requests, FakeOllama.reply = [], ["8", "5"]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeOllama)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/chat"
    server.shutdown(); server.server_close()


def test_ollama_judge_sends_the_books_request_and_reads_the_stream(ollama):
    judge = OllamaJudge(url=ollama)
    rec = {"instruction": "Name the author of 'Emma'.", "input": "", "output": "Jane Austen."}
    assert judge(format_prompt(rec), rec["output"], "Austen") == 85.0
    (req,) = FakeOllama.requests
    assert req["path"] == "/api/chat" and req["content_type"] == "application/json"
    assert req["body"]["model"] == "llama3"
    assert req["body"]["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048}
    assert req["body"]["messages"] == [{"role": "user", "content": judge_prompt(format_prompt(rec), rec["output"],
                                                                              "Austen")}]
    content = req["body"]["messages"][0]["content"]
    assert content.startswith(f"Given the input `{format_prompt(rec)}` and correct output `Jane Austen.`, "
                              "score the model response `Austen` on a scale from 0 to 100")
    assert content.endswith("Respond with the integer number only.")


def test_score_responses_with_ollama(ollama):
    recs = [{"instruction": f"q{i}", "input": "", "output": "a", "model_response": "b"} for i in range(3)]
    res = score_responses(recs, OllamaJudge(url=ollama))
    assert res == {"scores": [85.0] * 3, "mean": 85.0, "n_scored": 3, "unscored": []}
    FakeOllama.reply = ["I would say ", "it is good"]  # no number: not scored, not an error
    res = score_responses(recs, OllamaJudge(url=ollama))
    assert res["n_scored"] == 0 and res["unscored"] == [0, 1, 2]


def test_ollama_judge_errors_say_what_to_do(ollama):
    with pytest.raises(JudgeError, match=r"HTTP 404.*ollama pull mistral"):
        OllamaJudge(model="mistral", url=ollama).query("hi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]  # free, and nothing listens on it after close
    with pytest.raises(JudgeError, match=r"Could not reach Ollama.*ollama serve"):
        OllamaJudge(url=f"http://127.0.0.1:{port}/api/chat", timeout=5)("p", "r", "a")


def test_parse_score():
    assert [parse_score(s) for s in ["100", "0", "Score: 7", "85.5", "", "101", "-"]] == [100, 0, 7, 85.5, None,
                                                                                         None, None]


def test_parse_score_keeps_the_sign():
    assert [parse_score(s) for s in ["-5", "Score: -5 out of 100", "+7", "-0"]] == [None, None, 7, 0]


class BadOllama(http.server.BaseHTTPRequestHandler):
    "A server that answers in a way the judge must refuse: `mode` says which."
    mode = "trickle"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200); self.send_header("Content-Type", "application/x-ndjson"); self.end_headers()
        if self.mode == "html": self.wfile.write(b"<html>502 Bad Gateway</html>\n"); return
        if self.mode == "list": self.wfile.write(b"[1, 2]\n"); return
        try:  # a byte every 0.2 s for up to 10 s: each read is quick, the whole reply is not
            for _ in range(50):
                self.wfile.write(b" "); self.wfile.flush(); time.sleep(0.2)
        except OSError: pass  # the judge hung up

    def log_message(self, *args): pass


@pytest.fixture
def bad_ollama():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), BadOllama)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/api/chat"
    server.shutdown(); server.server_close()


@pytest.mark.parametrize("mode", ["html", "list"])
def test_ollama_judge_refuses_a_reply_that_is_not_chat_json(bad_ollama, mode):
    BadOllama.mode = mode
    with pytest.raises(JudgeError, match="not a chat message"): OllamaJudge(url=bad_ollama).query("hi")


def test_ollama_judge_timeout_bounds_the_whole_reply(bad_ollama):
    BadOllama.mode = "trickle"
    t0 = time.monotonic()
    with pytest.raises(JudgeError, match=r"within 1 s"): OllamaJudge(url=bad_ollama, timeout=1).query("hi")
    assert time.monotonic() - t0 < 3  # not the 10 s the server would take
