"""POST /files and GET /files: validation, limits, idempotency."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.api.conftest import SAMPLE, Tenant, upload


def _line(user: str = "hi", assistant: str = "hello") -> bytes:
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return json.dumps({"messages": messages}).encode()


def test_upload_stores_the_file_and_reports_its_metadata(client, tenant_a: Tenant, store):
    response = upload(client, tenant_a, filename="my data.jsonl")

    assert response.status_code == 201
    body = response.json()
    data = SAMPLE.read_bytes()
    assert body["id"].startswith("file-")
    assert body["filename"] == "my data.jsonl"
    assert body["bytes"] == len(data)
    assert body["num_examples"] == sum(1 for line in data.splitlines() if line.strip())
    assert store.get_bytes(f"files/{tenant_a.id}/{body['id']}.jsonl") == data
    fetched = client.get(f"/files/{body['id']}", headers=tenant_a.headers)
    assert fetched.status_code == 200 and fetched.json() == body
    listed = client.get("/files", headers=tenant_a.headers).json()
    assert [f["id"] for f in listed["data"]] == [body["id"]]


def test_malformed_upload_lists_every_problem_with_its_line(client, tenant_a: Tenant):
    data = b"\n".join(
        [
            _line(),
            b"{not json",
            _line(),
            b'{"messages": [{"role": "robot", "content": "x"}]}',
            b"[]",
        ]
    )

    response = upload(client, tenant_a, data)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_training_file"
    assert error["line"] == 2
    assert "line 2" in error["message"]
    lines = [detail["line"] for detail in error["details"]]
    assert lines[0] == 2 and {2, 4, 5} <= set(lines) and 1 not in lines and 3 not in lines
    codes = {detail["code"] for detail in error["details"]}
    assert {"invalid_json", "unknown_role", "not_an_object"} <= codes
    assert client.get("/files", headers=tenant_a.headers).json()["data"] == []


def test_file_over_the_size_limit_is_refused_with_413(client, tenant_a: Tenant, settings):
    line = _line("x" * 500) + b"\n"
    data = line * (settings.max_upload_bytes // len(line) + 1)
    assert settings.max_upload_bytes < len(data) < settings.max_upload_bytes + 60_000

    response = upload(client, tenant_a, data)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "file_too_large"


def test_request_body_far_over_the_limit_is_refused_before_it_is_read(client, tenant_a, settings):
    data = b"x" * (settings.max_upload_bytes * 3)

    response = upload(client, tenant_a, data)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_streamed_body_without_content_length_is_cut_off_at_the_limit(client, tenant_a, settings):
    sent = 0
    chunk = b"x" * 16384

    def body():
        nonlocal sent
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n'
        for _ in range(settings.max_upload_bytes * 4 // len(chunk)):
            sent += len(chunk)
            yield chunk
        yield b"\r\n--b--\r\n"

    headers = {**tenant_a.headers, "Content-Type": "multipart/form-data; boundary=b"}
    response = client.post("/files", headers=headers, content=body())

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_too_many_examples_is_a_413_naming_the_limit(client, tenant_a: Tenant, settings):
    data = b"\n".join([_line()] * (settings.max_examples + 1))

    response = upload(client, tenant_a, data)

    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "too_many_examples"
    assert error["line"] == settings.max_examples + 1


def test_idempotent_upload_returns_the_same_file(client: TestClient, tenant_a: Tenant):
    headers = {"Idempotency-Key": "upload-1"}
    first = upload(client, tenant_a, headers=headers)
    again = upload(client, tenant_a, headers=headers)
    different = upload(client, tenant_a, _line() + b"\n", headers=headers)

    assert first.status_code == 201
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert different.status_code == 409
    assert different.json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/files", headers=tenant_a.headers).json()["data"]) == 1


def test_idempotency_keys_are_per_tenant(client, tenant_a: Tenant, tenant_b: Tenant):
    headers = {"Idempotency-Key": "shared-key"}
    a = upload(client, tenant_a, headers=headers).json()
    b = upload(client, tenant_b, headers=headers).json()

    assert a["id"] != b["id"]


def test_upload_needs_a_valid_key(client, tenant_a: Tenant):
    missing = client.post("/files", files={"file": ("a.jsonl", _line())})
    wrong = client.post(
        "/files",
        headers={"Authorization": tenant_a.headers["Authorization"][:-3] + "abc"},
        files={"file": ("a.jsonl", _line())},
    )

    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert wrong.headers["www-authenticate"] == "Bearer"
