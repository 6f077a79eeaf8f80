"""Shared pytest set-up: the offline data mirror and a throw-away cache for every test session."""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The canonical files sit in ../shared/data beside the clone (CI and this project's machines).
_MIRROR = REPO.parent / "shared" / "data"
if "LLM_SCRATCH_DATA" not in os.environ and _MIRROR.is_dir():
    os.environ["LLM_SCRATCH_DATA"] = str(_MIRROR)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    "An empty cache folder, used by `fetch` for this test only."
    cache = tmp_path / "cache"
    monkeypatch.setenv("LLM_SCRATCH_CACHE", str(cache))
    return cache

