"""The schema comes from Alembic migrations and matches the ORM classes, on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.db import current_revision, downgrade, get_engine, migrate, session_scope
from core.dbmodels import Base, Tenant
from tests.dbutil import (
    create_pg_database,
    db_url_for,
    drop_pg_database,
    pg_available,
    unique,
)

TABLES = {"tenants", "api_keys", "files", "jobs", "job_events", "idempotency_records"}


#: The newest migration; bump with each new file in core/migrations/versions.
HEAD_REVISION = "0002"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    return db_url_for(request.param, tmp_path)


def test_migrations_create_every_table_and_match_the_models(db_url: str):
    engine = get_engine(db_url)

    assert set(inspect(engine).get_table_names()) >= TABLES
    assert current_revision(db_url) == HEAD_REVISION
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_migrate_is_idempotent(db_url: str):
    migrate(db_url)
    assert current_revision(db_url) == HEAD_REVISION


def test_downgrade_and_upgrade_round_trip_on_a_fresh_postgres_database():
    if not pg_available():
        pytest.skip("PostgreSQL is not reachable")
    url = create_pg_database()
    try:
        migrate(url)
        downgrade(url, "base")
        assert not TABLES & set(inspect(get_engine(url)).get_table_names())
        migrate(url)
        assert set(inspect(get_engine(url)).get_table_names()) >= TABLES
    finally:
        drop_pg_database(url)


def test_timestamps_come_back_timezone_aware_in_utc(db_url: str):
    moment = datetime(2025, 5, 1, 12, 30, tzinfo=timezone(timedelta(hours=2)))
    with session_scope(db_url) as session:
        tenant = Tenant(id=unique("tenant"), name=unique("tz"), created_at=moment)
        session.add(tenant)
        session.commit()
        tenant_id = tenant.id
    with session_scope(db_url) as session:
        stored = session.get(Tenant, tenant_id)
        assert stored is not None
        assert stored.created_at == moment
        assert stored.created_at.tzinfo is not None
        assert stored.created_at.utcoffset() == timedelta(0)
        assert stored.created_at.astimezone(UTC).hour == 10


def test_naive_timestamps_are_refused(db_url: str):
    with session_scope(db_url) as session:
        naive = datetime(2025, 1, 1)
        session.add(Tenant(id=unique("tenant"), name=unique("naive"), created_at=naive))
        with pytest.raises(Exception, match="naive datetime"):
            session.commit()
