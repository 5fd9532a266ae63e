"""Dependencies of the routes, as ``Annotated`` aliases.

Everything comes from ``app.state`` (filled by :func:`api.app.create_app`), so a test builds an
app with its own settings, store and dispatcher instead of patching globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.errors import ApiError
from core.auth import AuthenticationError, Principal, authenticate
from core.dispatch import Dispatcher, get_dispatcher
from core.settings import Settings
from core.storage import ObjectStore

_bearer = HTTPBearer(
    auto_error=False, description="A Tether API key: 'Authorization: Bearer tth_...'"
)


def get_app_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A database session for one request, closed (and rolled back if uncommitted) after it."""
    with request.app.state.sessionmaker() as session:
        yield session


def get_object_store(request: Request) -> ObjectStore:
    """The app's object store."""
    store: ObjectStore = request.app.state.store
    return store


def get_job_dispatcher(request: Request) -> Dispatcher:
    """The dispatcher given to the app, else the process-wide one."""
    dispatcher: Dispatcher | None = request.app.state.dispatcher
    return dispatcher or get_dispatcher(request.app.state.settings)


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StoreDep = Annotated[ObjectStore, Depends(get_object_store)]
DispatcherDep = Annotated[Dispatcher, Depends(get_job_dispatcher)]


def require_tenant(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The principal of the request's API key; 401 without a valid key."""
    if credentials is None:
        raise ApiError(
            401,
            "missing_api_key",
            "missing API key; send 'Authorization: Bearer tth_...'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        return authenticate(session, credentials.credentials)
    except AuthenticationError as error:
        raise ApiError(
            401, "invalid_api_key", str(error), headers={"WWW-Authenticate": "Bearer"}
        ) from None


TenantDep = Annotated[Principal, Depends(require_tenant)]


def require_admin(principal: TenantDep) -> Principal:
    """The principal of an admin key; 403 for tenant keys."""
    if not principal.is_admin:
        raise ApiError(403, "admin_required", "this route needs an admin API key")
    return principal


AdminDep = Annotated[Principal, Depends(require_admin)]

IdempotencyKeyDep = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Retry-safe creation: the same key and body return the same object.",
    ),
]
