"""A real S3 HTTP endpoint for tests: moto's server, once per session, on a free port."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

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
