"""Tenant isolation: walk every route of the app and check tenant B cannot reach A's objects.

B must get 404 (not 403 or 409, which would confirm that the object exists) for every route
that names one of A's objects, and routes that list things must not show A's ids. New routes
are covered automatically; a route with a path parameter this test does not know fails it, so
whoever adds the route says which object the parameter names.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

from core.storage import released_prefix
from tests.api.conftest import Tenant, create_job, drive_job, upload

#: Routes that answer B with 403 for reasons that reveal nothing about A's objects.
_ADMIN_PREFIX = "/admin/"
_SIGNED_PREFIX = "/downloads/"


def _api_routes(app: FastAPI) -> Iterator[Any]:
    """Every API route of the app, with routers included via ``include_router`` flattened.

    FastAPI >= 0.160 keeps included routers as nested entries of ``app.routes``;
    ``iter_route_contexts`` yields their routes with the full path.
    """
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is flat already
        yield from (route for route in app.routes if isinstance(route, APIRoute))
        return
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, APIRoute):
            yield context


def _path_values(job_id: str, file_id: str, tenant: Tenant) -> dict[str, str]:
    return {
        "job_id": job_id,
        "fine_tuning_job_id": job_id,
        "file_id": file_id,
        "tenant_id": tenant.id,
        "key": released_prefix(tenant.id, job_id) + "adapter_model.safetensors",
    }


def test_tenant_b_cannot_see_or_touch_tenant_a_objects(
    app, client, tenant_a: Tenant, tenant_b: Tenant, db_url, store
):
    file_id = upload(client, tenant_a).json()["id"]
    job_id = create_job(client, tenant_a, file_id).json()["id"]
    drive_job(db_url, store, job_id)  # reports and a released adapter exist
    values = _path_values(job_id, file_id, tenant_a)
    job_body = {"model": "tiny-random", "training_file": file_id, "reason": "leak it"}
    walked = []

    for route in _api_routes(app):
        params = set(route.param_convertors)
        unknown = params - set(values)
        assert not unknown, f"{route.path}: teach this test what {unknown} names"
        path = route.path_format.format(**{name: values[name] for name in params})
        for method in sorted(route.methods - {"HEAD"}):
            walked.append(f"{method} {route.path}")
            extra = {"params": {"expires": "9999999999", "signature": "00"}}
            if method == "GET" and params and not path.startswith(_SIGNED_PREFIX):
                owner = client.get(path, headers=tenant_a.headers)
                assert owner.status_code == 200, f"A cannot {method} {route.path}"
            response = client.request(
                method, path, headers=tenant_b.headers, json=job_body, **extra
            )
            label = f"B {method} {route.path} -> {response.status_code}"
            if route.path.startswith(_ADMIN_PREFIX) or route.path.startswith(_SIGNED_PREFIX):
                assert response.status_code == 403, label
            elif params:
                assert response.status_code == 404, label
                assert response.json()["error"]["code"].endswith("not_found"), label
            elif method == "POST":
                assert response.status_code >= 400, label
            else:
                assert job_id not in response.text and file_id not in response.text, label
    stream = client.get(f"/jobs/{job_id}/events?stream=true", headers=tenant_b.headers)
    assert stream.status_code == 404
    for cursor_route in ("/jobs", "/files"):
        response = client.get(f"{cursor_route}?after={job_id}", headers=tenant_b.headers)
        assert response.status_code == 400, cursor_route
    assert {"GET /jobs/{job_id}/adapter", "POST /jobs/{job_id}/cancel"} <= set(walked)
    assert len(walked) >= 15
