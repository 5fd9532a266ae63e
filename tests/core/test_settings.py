from pathlib import Path

import pytest
from pydantic import ValidationError

from core.settings import DEFAULT_SECRET, Settings, get_settings


def test_environment_variables_use_the_tether_prefix(monkeypatch):
    monkeypatch.setenv("TETHER_MAX_ASR", "0.02")
    monkeypatch.setenv("TETHER_STORAGE_BACKEND", "s3")
    monkeypatch.setenv("TETHER_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    settings = get_settings()
    assert settings.max_asr == 0.02
    assert settings.storage_backend == "s3"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"
    assert get_settings() is settings  # cached


def test_embedded_defaults_live_under_the_data_dir(tmp_path):
    settings = Settings(data_dir=tmp_path, database_url="")
    assert settings.resolved_database_url == f"sqlite:///{tmp_path.as_posix()}/tether.db"
    assert settings.resolved_storage_dir == tmp_path / "objects"
    assert Settings(storage_local_dir=Path("/srv/x")).resolved_storage_dir == Path("/srv/x")


def test_default_secret_is_refused_outside_development():
    assert Settings(environment="development", secret_key=DEFAULT_SECRET)
    with pytest.raises(ValidationError, match="TETHER_SECRET_KEY"):
        Settings(environment="production", secret_key=DEFAULT_SECRET)


def test_short_secret_is_refused():
    with pytest.raises(ValidationError, match="at least 16"):
        Settings(secret_key="short")


def test_thresholds_are_bounded():
    with pytest.raises(ValidationError):
        Settings(max_asr=1.5)
