"""Tenants and API keys: hashed at rest, found by prefix, revocable."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core import auth
from core.db import session_scope
from core.dbmodels import ApiKey
from tests.dbutil import db_url_for, unique


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    return db_url_for(request.param, tmp_path)


def test_a_new_key_authenticates_as_its_tenant(db_url: str):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique())
        issued = auth.create_api_key(session, tenant.id, name="ci")

        principal = auth.authenticate(session, f"Bearer {issued.plaintext}")

    assert issued.plaintext.startswith(f"tth_{issued.prefix}_")
    assert principal == auth.Principal(tenant_id=tenant.id, key_id=issued.id, is_admin=False)


def test_only_a_hash_of_the_key_is_stored(db_url: str):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique())
        issued = auth.create_api_key(session, tenant.id)
        row = session.scalar(select(ApiKey).where(ApiKey.id == issued.id))

    assert row is not None
    secret = issued.plaintext.split("_", 2)[2]
    stored = " ".join(str(value) for value in vars(row).values())
    assert secret not in stored
    assert row.key_hash == auth.hash_key(issued.plaintext)


@pytest.mark.parametrize(
    "token",
    [None, "", "Bearer ", "not-a-key", "tth_short_x", "tth_0123456789ab_wrong-secret"],
)
def test_bad_tokens_are_refused(db_url: str, token):
    with session_scope(db_url) as session, pytest.raises(auth.AuthenticationError):
        auth.authenticate(session, token)


def test_a_wrong_secret_with_a_real_prefix_is_refused(db_url: str):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique())
        issued = auth.create_api_key(session, tenant.id)
        forged = f"tth_{issued.prefix}_{'A' * 43}"

        with pytest.raises(auth.AuthenticationError, match="invalid API key"):
            auth.authenticate(session, forged)


def test_revoked_keys_stop_working(db_url: str):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique())
        issued = auth.create_api_key(session, tenant.id)
        auth.revoke_api_key(session, issued.id)

        with pytest.raises(auth.AuthenticationError, match="revoked"):
            auth.authenticate(session, issued.plaintext)


def test_admin_keys_and_last_use(db_url: str):
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, unique())
        issued = auth.create_api_key(session, tenant.id, admin=True)

        principal = auth.authenticate(session, issued.plaintext)
        row = session.get(ApiKey, issued.id)

    assert principal.is_admin
    assert row is not None and row.last_used_at is not None


def test_tenant_names_are_unique_and_findable(db_url: str):
    name = unique()
    with session_scope(db_url) as session:
        tenant = auth.create_tenant(session, name, max_concurrent_jobs=2)

        with pytest.raises(auth.TenantExistsError, match=name):
            auth.create_tenant(session, name)
        assert auth.find_tenant(session, name).id == tenant.id
        assert auth.find_tenant(session, tenant.id).max_concurrent_jobs == 2
        with pytest.raises(auth.TenantNotFoundError):
            auth.create_api_key(session, "tenant-missing")
