"""Databases for tests: a fresh, migrated PostgreSQL database per test run, SQLite files.

PostgreSQL tests use a database of their own (``tether_test_<random>``), created through the
``postgres`` maintenance database, migrated with Alembic (the production path) and dropped when
the test process exits. Tests share it and stay independent by creating their own tenants.
"""

from __future__ import annotations

import atexit
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from core.db import dispose_engines, migrate

PG_ADMIN_URL = os.environ.get(
    "TETHER_TEST_PG_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
_shared_pg_url: str | None = None


def pg_available() -> bool:
    """Whether the test PostgreSQL server answers."""
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        engine.dispose()
    except Exception:
        return False
    return True


def _admin_execute(statement: str) -> None:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(text(statement))
    finally:
        engine.dispose()


def create_pg_database() -> str:
    """Create an empty database with a random name and return its URL."""
    name = f"tether_test_{uuid.uuid4().hex[:12]}"
    _admin_execute(f'CREATE DATABASE "{name}"')
    return make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


def drop_pg_database(url: str) -> None:
    """Drop a database made by :func:`create_pg_database`, closing its connections first."""
    dispose_engines()
    name = make_url(url).database
    assert name and name.startswith("tether_test_"), name
    _admin_execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def shared_pg_url() -> str:
    """A migrated PostgreSQL database shared by this test process (skips without a server)."""
    global _shared_pg_url
    if _shared_pg_url is None:
        if not pg_available():
            pytest.skip(f"PostgreSQL is not reachable at {PG_ADMIN_URL}")
        url = create_pg_database()
        atexit.register(drop_pg_database, url)
        migrate(url)
        _shared_pg_url = url
    return _shared_pg_url


def sqlite_url(directory: Path) -> str:
    """A migrated SQLite database file in ``directory``."""
    url = f"sqlite:///{(Path(directory) / f'tether-{uuid.uuid4().hex[:8]}.db').as_posix()}"
    migrate(url)
    return url


def db_url_for(backend: str, directory: Path) -> str:
    """A migrated database of ``backend`` (``sqlite`` or ``postgresql``)."""
    return shared_pg_url() if backend == "postgresql" else sqlite_url(directory)


class RecordingDispatcher:
    """A dispatcher that only remembers which jobs it was handed."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, job_id: str) -> None:
        self.submitted.append(job_id)


class FailingDispatcher:
    """A dispatcher whose broker is down."""

    def submit(self, job_id: str) -> None:
        raise ConnectionError("broker unreachable")


def unique(prefix: str = "t") -> str:
    """A name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def settings_for(db_url: str, directory: Path, **overrides: Any) -> Any:
    """Settings for a test app: its own database URL and data directory."""
    from core.settings import Settings

    return Settings(database_url=db_url, data_dir=directory, **overrides)
