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

import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402

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


@pytest.fixture(scope="session")
def small_critic():
    """A Safety Critic trained on a subset of the built-in train split, saved where the worker
    looks for it (seconds; the full one is `tether critic train`). Returns the artifact path."""
    from safety.critic import CriticData, critic_data, train_critic
    from workers.risk import critic_dir

    def subset(data: CriticData, step: int) -> CriticData:
        return CriticData(*(getattr(data, n)[::step] for n in CriticData.__dataclass_fields__))

    path = critic_dir(get_settings()) / "critic.json"
    if not path.is_file():
        train_critic(
            path,
            train=subset(critic_data("train"), 3),
            validation=subset(critic_data("validation"), 3),
            layers=(2, 4),
            penalties=(0.1,),
            response_tokens=32,
        )
    return path


# --- a real S3 HTTP endpoint: moto's server, once per session, on a free port ----------------

_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Keep a developer's own ~/.aws files out of the tests.
    "AWS_CONFIG_FILE": "/nonexistent/tether-tests/aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/tether-tests/aws-credentials",
}
_UNSET_AWS_ENV = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


@pytest.fixture(scope="session")
def s3_endpoint_url() -> Iterator[str]:
    """URL of a moto S3 server running in a thread; fake AWS credentials are set meanwhile."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in _FAKE_AWS_ENV.items():
            patch.setenv(name, value)
        for name in _UNSET_AWS_ENV:
            patch.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket_name(s3_endpoint_url: str) -> str:
    """A bucket name no other test uses, so tests sharing the server stay independent."""
    return f"tether-test-{uuid.uuid4().hex[:16]}"
