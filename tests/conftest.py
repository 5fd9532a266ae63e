"""Shared test set-up: every test session gets its own data dir and model cache.

The environment is set at import time, before any test module imports code that reads
settings, so nothing a test does touches the user's real cache or database.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="tether-tests-"))
os.environ.setdefault("TETHER_MODEL_CACHE_DIR", str(_SESSION_DIR / "models"))
os.environ.setdefault("TETHER_DATA_DIR", str(_SESSION_DIR / "var"))
os.environ.setdefault("TETHER_ENVIRONMENT", "test")
os.environ.setdefault("TETHER_SECRET_KEY", "test-secret-key-not-for-production")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from core.settings import get_settings  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_settings():
    """Settings are cached per process; tests that change the environment get a fresh read."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def tiny_model():
    """The tiny-random model, tokenizer and spec (built once per session, in seconds)."""
    from workers.models import load

    return load("tiny-random", device="cpu")
