"""GPT-2 checkpoints through `huggingface_hub`: a local HTTP endpoint (HF_ENDPOINT) stands in for the hub and serves a
tiny checkpoint; it lands in Hugging Face's cache (HF_HOME), loads offline afterwards (HF_HUB_OFFLINE), is refused
when its checksum is wrong, and the local mirror (LLM_SCRATCH_DATA) is asked first."""
import hashlib
import http.server
import os
import subprocess
import sys
import threading

import pytest
import torch

pytest.importorskip("huggingface_hub")

REPO_ID, COMMIT = "test-org/tiny-gpt2", "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub(tmp_path):
    "A fake hub on 127.0.0.1 serving `REPO_ID`'s model.safetensors (a tiny GPT); yields (url, file bytes, request log)."
    from llm_scratch.model import GPTConfig, GPTModel
    from llm_scratch.weights import save_gpt2
    torch.manual_seed(0)
    data = (save_gpt2(GPTModel(GPTConfig.from_preset("tiny", vocab_size=300)), tmp_path / "src") /
            "model.safetensors").read_bytes()
    log = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args): pass

        def _head(self):
            log.append((self.command, self.path))
            if self.path.split("?")[0] != f"/{REPO_ID}/resolve/main/model.safetensors":
                self.send_response(404); self.send_header("Content-Length", "0"); self.end_headers(); return None
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            return start

        def do_HEAD(self): self._head()

        def do_GET(self):
            start = self._head()
            if start is not None: self.wfile.write(data[start:])

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data, log
    server.shutdown()


def load(tmp_path, endpoint, sha256=None, **env):
    "Load checkpoint 'test-tiny' (preset tiny, vocabulary 300) in a fresh process; its token-embedding checksum."
    script = f"""
import hashlib
from llm_scratch import weights
from llm_scratch.model import PRESETS
PRESETS["tiny-300"] = {{**PRESETS["tiny"], "vocab_size": 300}}
weights.GPT2_CHECKPOINTS["test-tiny"] = weights.Checkpoint("tiny-300", "http://127.0.0.1:9/unused", {sha256!r}, {REPO_ID!r})
m = weights.load_gpt2("test-tiny", progress=False)
print(hashlib.sha256(m.tok_emb.weight.detach().numpy().tobytes()).hexdigest())
"""
    e = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "LLM_SCRATCH_CACHE": str(tmp_path / "c"),
         **env}
    e.pop("LLM_SCRATCH_DATA", None)
    e.update({k: v for k, v in env.items()})
    return subprocess.run([sys.executable, "-c", script], env=e, capture_output=True, text=True, timeout=300)


def expected(data):
    from safetensors.torch import load
    return hashlib.sha256(load(data)["transformer.wte.weight"].numpy().tobytes()).hexdigest()


def test_a_checkpoint_comes_through_the_hub_into_its_cache_and_loads_offline(hub, tmp_path):
    endpoint, data, log = hub
    p = load(tmp_path, endpoint, hashlib.sha256(data).hexdigest())
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip() == expected(data)
    assert ("GET", f"/{REPO_ID}/resolve/main/model.safetensors") in log
    cached = list((tmp_path / "hf" / "hub").glob("models--test-org--tiny-gpt2/snapshots/*/model.safetensors"))
    assert len(cached) == 1 and cached[0].read_bytes() == data  # in Hugging Face's cache, not ours
    log.clear()
    p = load(tmp_path, "http://127.0.0.1:9", hashlib.sha256(data).hexdigest(), HF_HUB_OFFLINE="1")
    assert p.returncode == 0 and p.stdout.strip() == expected(data) and not log, p.stderr[-3000:]


def test_a_wrong_checksum_is_refused_and_an_unreachable_hub_says_what_to_do(hub, tmp_path):
    endpoint, data, _ = hub
    p = load(tmp_path, endpoint, "0" * 64)
    assert p.returncode != 0 and "ChecksumError" in p.stderr and "expected 0000" in p.stderr
    p = load(tmp_path / "other", "http://127.0.0.1:9")
    assert p.returncode != 0 and "FetchError" in p.stderr and "LLM_SCRATCH_DATA" in p.stderr


def test_the_mirror_is_asked_before_the_hub(hub, tmp_path):
    endpoint, data, log = hub
    mirror = tmp_path / "mirror" / "gpt2-weights" / "tiny-300"
    mirror.mkdir(parents=True)
    (mirror / "model.safetensors").write_bytes(data)
    p = load(tmp_path, endpoint, hashlib.sha256(data).hexdigest(), LLM_SCRATCH_DATA=str(tmp_path / "mirror"))
    assert p.returncode == 0 and p.stdout.strip() == expected(data), p.stderr[-3000:]
    assert not log  # not one request to the hub
