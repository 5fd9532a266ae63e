"""Tenants and API keys.

A key looks like ``tth_<prefix>_<secret>``: ``prefix`` (12 hex digits) is stored in clear and
indexed so a request finds its key row in one lookup; ``secret`` (``secrets.token_urlsafe(32)``)
is never stored, only the SHA-256 of the whole key. A salted slow hash buys nothing for 256
random bits, and a plain digest keeps keys valid when ``secret_key`` is rotated. Digests are
compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from core.dbmodels import ApiKey, Tenant, new_id, utcnow

KEY_SCHEME = "tth_"
PREFIX_HEX_DIGITS = 12
#: ``last_used_at`` is written at most this often per key, not on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


class AuthenticationError(Exception):
    """A missing, malformed, unknown or revoked API key (the API answers 401)."""


class TenantNotFoundError(LookupError):
    """No tenant has the id (or name)."""


class TenantExistsError(ValueError):
    """A tenant with that name already exists."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts for: the key's tenant, the key itself and whether it is an admin key."""

    tenant_id: str
    key_id: str
    is_admin: bool = False


@dataclass(frozen=True)
class IssuedKey:
    """A newly created API key; ``plaintext`` is shown once and never stored."""

    id: str
    tenant_id: str
    name: str
    prefix: str
    is_admin: bool
    created_at: datetime
    plaintext: str


def hash_key(plaintext: str) -> str:
    """Hex SHA-256 of a whole API key."""
    return hashlib.sha256(plaintext.encode()).hexdigest()


def parse_key(plaintext: str) -> tuple[str, str]:
    """Split ``tth_<prefix>_<secret>`` into ``(prefix, secret)``.

    Raises:
        AuthenticationError: the value does not have the shape of a Tether key.
    """
    prefix, _, secret = plaintext.removeprefix(KEY_SCHEME).partition("_")
    if not plaintext.startswith(KEY_SCHEME) or len(prefix) != PREFIX_HEX_DIGITS or not secret:
        raise AuthenticationError("malformed API key; keys look like 'tth_<prefix>_<secret>'")
    return prefix, secret


# --- tenants --------------------------------------------------------------------------------


def create_tenant(
    session: Session,
    name: str,
    *,
    tenant_id: str | None = None,
    max_concurrent_jobs: int | None = None,
) -> Tenant:
    """Create a tenant and commit.

    Args:
        name: unique, human-readable name (the CLI's ``--tenant``).
        tenant_id: the id; default ``tenant-<hex>``. It appears in storage keys.
        max_concurrent_jobs: most non-terminal jobs at once; ``None``: the deployment default.

    Raises:
        TenantExistsError: the name is taken.
    """
    if max_concurrent_jobs is not None and max_concurrent_jobs < 0:
        raise ValueError(f"max_concurrent_jobs must be >= 0 or None, got {max_concurrent_jobs}")
    if session.scalar(select(Tenant.id).where(Tenant.name == name)) is not None:
        raise TenantExistsError(f"a tenant named {name!r} already exists")
    tenant = Tenant(
        id=tenant_id or new_id("tenant"), name=name, max_concurrent_jobs=max_concurrent_jobs
    )
    session.add(tenant)
    session.commit()
    return tenant


def get_tenant(session: Session, tenant_id: str) -> Tenant:
    """The tenant with ``tenant_id``.

    Raises:
        TenantNotFoundError: there is none.
    """
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise TenantNotFoundError(f"no tenant with id {tenant_id!r}")
    return tenant


def find_tenant(session: Session, id_or_name: str) -> Tenant:
    """The tenant whose id or name is ``id_or_name`` (the CLI accepts either).

    Raises:
        TenantNotFoundError: there is none.
    """
    tenant = session.get(Tenant, id_or_name) or session.scalar(
        select(Tenant).where(Tenant.name == id_or_name)
    )
    if tenant is None:
        raise TenantNotFoundError(f"no tenant with id or name {id_or_name!r}")
    return tenant


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, oldest first."""
    return list(session.scalars(select(Tenant).order_by(Tenant.created_at, Tenant.id)))


# --- keys -----------------------------------------------------------------------------------


def create_api_key(
    session: Session, tenant_id: str, *, name: str = "default", admin: bool = False
) -> IssuedKey:
    """Create an API key for a tenant and commit; the plaintext is in the result only.

    Raises:
        TenantNotFoundError: the tenant does not exist.
    """
    get_tenant(session, tenant_id)
    prefix = secrets.token_hex(PREFIX_HEX_DIGITS // 2)
    plaintext = f"{KEY_SCHEME}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=new_id("key"),
        tenant_id=tenant_id,
        name=name,
        prefix=prefix,
        key_hash=hash_key(plaintext),
        is_admin=admin,
        created_at=utcnow(),
    )
    session.add(key)
    session.commit()
    return IssuedKey(key.id, tenant_id, name, prefix, admin, key.created_at, plaintext)


def revoke_api_key(session: Session, key_id: str) -> None:
    """Revoke a key (idempotent) and commit; it stops authenticating at once.

    Raises:
        LookupError: no key has that id.
    """
    key = session.get(ApiKey, key_id)
    if key is None:
        raise LookupError(f"no API key with id {key_id!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.commit()


def authenticate(session: Session, bearer: str | None) -> Principal:
    """Resolve a bearer token (the key, with or without ``Bearer ``) to its principal.

    Raises:
        AuthenticationError: missing, malformed, unknown or revoked key.
    """
    if not bearer:
        raise AuthenticationError(
            "missing API key; send 'Authorization: Bearer tth_...' (create a key with "
            "`tether keys create --tenant NAME`)"
        )
    token = bearer.removeprefix("Bearer ").strip()
    prefix, _ = parse_key(token)
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    # Compare even when no row matched, so timing does not reveal which prefixes exist.
    expected = key.key_hash if key is not None else hash_key("")
    if not hmac.compare_digest(expected, hash_key(token)) or key is None:
        raise AuthenticationError("invalid API key")
    if key.revoked_at is not None:
        raise AuthenticationError("this API key has been revoked")
    now = utcnow()
    if key.last_used_at is None or now - key.last_used_at > LAST_USED_RESOLUTION:
        key.last_used_at = now
        session.commit()
    return Principal(tenant_id=key.tenant_id, key_id=key.id, is_admin=key.is_admin)
