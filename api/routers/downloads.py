"""Signed, expiring downloads from the local object store (S3 deployments use S3's own URLs)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.deps import SettingsDep, StoreDep
from api.errors import ApiError
from api.schemas import error_responses
from core.storage import LocalStore, verify_download_signature

router = APIRouter(prefix="/downloads", tags=["downloads"])


@router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={
        **error_responses(403, 404),
        200: {"content": {"application/octet-stream": {}}, "description": "The object."},
    },
)
def download(
    key: str,
    store: StoreDep,
    settings: SettingsDep,
    expires: Annotated[str, Query(max_length=20)],
    signature: Annotated[str, Query(max_length=128)],
) -> FileResponse:
    """Stream one object if the link's HMAC signature is valid and unexpired."""
    if not isinstance(store, LocalStore):
        raise ApiError(404, "not_found", "downloads are served by the object store directly")
    if not verify_download_signature(settings.secret_key, key, expires, signature):
        raise ApiError(
            403,
            "invalid_signature",
            "the download link is invalid or has expired; ask GET /jobs/{job_id}/adapter for "
            "a new one",
        )
    path = store.path_for(key)
    if not path.is_file():
        raise ApiError(404, "object_not_found", "the object behind this link no longer exists")
    return FileResponse(path, filename=path.name, media_type="application/octet-stream")
