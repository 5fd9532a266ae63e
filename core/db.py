"""Database engine, sessions and migrations.

One engine per database URL and process (:func:`get_engine`), sessions from
:func:`session_factory`, and the schema managed by Alembic only: :func:`migrate` builds the
Alembic configuration in code, so it works from an installed package with no ``alembic.ini``.

SQLite (the embedded default) and PostgreSQL (at scale) are both supported; the job state
machine relies on ``UPDATE ... WHERE status IN (...)`` row counts, which both give exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def make_engine(url: str, **kwargs: Any) -> Engine:
    """A new engine for ``url`` with the settings Tether relies on.

    SQLite gets foreign keys switched on, a busy timeout (the in-process worker and the API
    write from different threads) and ``check_same_thread=False``; PostgreSQL gets
    ``pool_pre_ping`` so a restarted server does not surface as errors.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": 30}
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    # WAL lets the API read while the in-process worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def get_engine(url: str) -> Engine:
    """The process-wide engine for ``url`` (created on first use)."""
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = _engines[url] = make_engine(url)
        return engine


def dispose_engines() -> None:
    """Close every pooled connection of the cached engines (tests, shutdown, after fork)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()


def session_factory(url_or_engine: str | Engine) -> sessionmaker[Session]:
    """A session factory bound to an engine (or to the cached engine of a URL)."""
    engine = get_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    return sessionmaker(bind=engine, expire_on_commit=False)


@contextmanager
def session_scope(url_or_engine: str | Engine) -> Iterator[Session]:
    """A session that is closed (and rolled back if uncommitted) on exit.

    The domain functions of :mod:`core.jobs` and :mod:`core.auth` commit their own changes.
    """
    with session_factory(url_or_engine)() as session:
        yield session


def alembic_config(url: str) -> Any:
    """The Alembic configuration for ``url``, built in code (no ``alembic.ini``)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # Passed as an attribute, not a main option: configparser would treat a '%' in a
    # password as interpolation syntax.
    config.attributes["url"] = url
    return config


def migrate(url: str, revision: str = "head") -> None:
    """Upgrade the database at ``url`` to ``revision`` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str) -> None:
    """Downgrade the database at ``url`` to ``revision`` (``"base"`` drops every table)."""
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    """The Alembic revision the database at ``url`` is at, or ``None`` when unmigrated."""
    from alembic.runtime.migration import MigrationContext

    with get_engine(url).connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def ping(url_or_engine: str | Engine) -> None:
    """Run ``SELECT 1``; raises when the database cannot be reached."""
    engine = get_engine(url_or_engine) if isinstance(url_or_engine, str) else url_or_engine
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
