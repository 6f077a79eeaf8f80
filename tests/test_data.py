"""fetch(): real downloads from a local HTTP server, zip extraction, checksums, mirror and cache rules."""
import hashlib
import http.server
import io
import os
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest

from llm_scratch import data
from llm_scratch.data import DATASETS, ChecksumError, FetchError, RemoteFile, fetch, sha256sum


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args): pass


@pytest.fixture
def server(tmp_path):
    "Serve tmp_path/www on 127.0.0.1 for the test; yields (folder, base_url)."
    www = tmp_path / "www"
    www.mkdir()
    handler = partial(QuietHandler, directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _files_in(folder: Path):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_download_verifies_and_lands_atomically(server, fresh_cache, monkeypatch):
    www, base = server
    body = os.urandom(300_000)
    (www / "blob.bin").write_bytes(body)
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    monkeypatch.setitem(DATASETS, "blob", data.Dataset("blob", (RemoteFile(
        "sub/blob.bin", f"{base}/blob.bin", hashlib.sha256(body).hexdigest()),)))
    p = fetch("blob", progress=False)
    assert p == fresh_cache / "sub" / "blob.bin"
    assert p.read_bytes() == body
    assert _files_in(fresh_cache) == ["sub/blob.bin"]  # no temp files left behind


def test_wrong_checksum_leaves_nothing(server, fresh_cache, monkeypatch):
    www, base = server
    (www / "blob.bin").write_bytes(b"not what you expected")
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    monkeypatch.setitem(DATASETS, "blob", data.Dataset("blob", (RemoteFile(
        "blob.bin", f"{base}/blob.bin", "0" * 64),)))
    with pytest.raises(ChecksumError, match="expected 0000"):
        fetch("blob", progress=False)
    assert _files_in(fresh_cache) == []


def test_zip_member_is_extracted(server, fresh_cache, monkeypatch):
    www, base = server
    member = b"ham\thello\nspam\tWIN A PRIZE\n"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme", "x")
        z.writestr("SMSSpamCollection", member)
    (www / "sms.zip").write_bytes(buf.getvalue())
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    rf = RemoteFile("SMSSpamCollection.tsv", f"{base}/sms.zip", hashlib.sha256(member).hexdigest(),
                    member="SMSSpamCollection")
    monkeypatch.setitem(DATASETS, "sms-spam", data.Dataset("sms-spam", (rf,)))
    assert fetch("sms-spam", progress=False).read_bytes() == member


def test_offline_without_mirror_names_url_and_env(fresh_cache, monkeypatch):
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    rf = DATASETS["the-verdict"].files[0]
    monkeypatch.setitem(DATASETS, "the-verdict", data.Dataset("the-verdict", (
        RemoteFile(rf.path, "http://127.0.0.1:9/the-verdict.txt", rf.sha256),)))
    with pytest.raises(FetchError) as e:
        fetch("the-verdict", progress=False)
    assert "http://127.0.0.1:9/the-verdict.txt" in str(e.value) and "LLM_SCRATCH_DATA" in str(e.value)
    assert _files_in(fresh_cache) == []


def test_cached_file_is_used_and_a_corrupt_one_replaced(server, fresh_cache, monkeypatch):
    www, base = server
    body = b"the real bytes\n"
    (www / "f.txt").write_bytes(body)
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    monkeypatch.setitem(DATASETS, "f", data.Dataset("f", (RemoteFile("f.txt", f"{base}/f.txt",
                                                                     hashlib.sha256(body).hexdigest()),)))
    p = fetch("f", progress=False)
    (www / "f.txt").unlink()  # from now on only the cache can answer
    assert fetch("f", progress=False) == p
    p.write_bytes(b"corrupted")  # a damaged cache entry is fetched again
    (www / "f.txt").write_bytes(body)
    assert fetch("f", progress=False).read_bytes() == body


def test_unknown_name_lists_known():
    with pytest.raises(FetchError, match="Known: .*tinyshakespeare"):
        fetch("tiny-shakespeare")


MIRROR = os.environ.get("LLM_SCRATCH_DATA")


@pytest.mark.skipif(not MIRROR, reason="no data mirror: set LLM_SCRATCH_DATA")
@pytest.mark.parametrize("name", list(DATASETS))
def test_every_dataset_from_the_mirror_matches_its_checksum(name, fresh_cache):
    p = fetch(name, progress=False)
    assert p.exists()
    for rf in DATASETS[name].files:
        assert sha256sum(fresh_cache / rf.path) == rf.sha256


@pytest.mark.skipif(not MIRROR, reason="no data mirror: set LLM_SCRATCH_DATA")
def test_mirror_with_a_bad_file_raises_and_caches_nothing(tmp_path, fresh_cache, monkeypatch):
    bad = tmp_path / "mirror"
    bad.mkdir()
    (bad / "the-verdict.txt").write_text("truncated")
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(bad))
    with pytest.raises(ChecksumError):
        fetch("the-verdict", progress=False)
    assert _files_in(fresh_cache) == []


def test_a_zip_bomb_is_cut_off_at_the_registered_size(server, fresh_cache, monkeypatch):
    www, base = server
    bomb = b"\0" * 50_000_000  # compresses to about 50 kB
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z: z.writestr("SMSSpamCollection", bomb)
    assert len(buf.getvalue()) < 100_000
    (www / "sms.zip").write_bytes(buf.getvalue())
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    rf = RemoteFile("SMSSpamCollection.tsv", f"{base}/sms.zip", "0" * 64, member="SMSSpamCollection", size=1_000)
    monkeypatch.setitem(DATASETS, "sms-spam", data.Dataset("sms-spam", (rf,)))
    with pytest.raises(data.TooLargeError, match="larger than the 1,000 bytes"): fetch("sms-spam", progress=False)
    assert _files_in(fresh_cache) == []  # not 50 MB on disk before the checksum could say no


def test_a_download_longer_than_its_registered_size_stops(server, fresh_cache, monkeypatch):
    www, base = server
    (www / "big.bin").write_bytes(b"x" * 200_000)
    monkeypatch.delenv("LLM_SCRATCH_DATA", raising=False)
    monkeypatch.setitem(DATASETS, "big", data.Dataset("big", (RemoteFile("big.bin", f"{base}/big.bin", "0" * 64,
                                                                        size=100),)))
    with pytest.raises(data.TooLargeError): fetch("big", progress=False)
    assert _files_in(fresh_cache) == []


def test_every_registered_file_has_its_size():
    for ds in DATASETS.values():
        for rf in ds.files: assert rf.size is not None and rf.size > 0, rf.path


@pytest.mark.skipif(not MIRROR, reason="no data mirror: set LLM_SCRATCH_DATA")
def test_registered_sizes_match_the_mirror():
    for ds in DATASETS.values():
        for rf in ds.files: assert (Path(MIRROR) / rf.path).stat().st_size == rf.size, rf.path


def test_a_mirror_that_is_not_a_folder_is_named(tmp_path, fresh_cache, monkeypatch):
    monkeypatch.setenv("LLM_SCRATCH_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FetchError, match=r"LLM_SCRATCH_DATA='.*nowhere' is not a folder"): fetch("the-verdict")
