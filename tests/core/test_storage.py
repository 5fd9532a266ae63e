"""The object store: one behaviour suite run against both backends, then backend specifics.

S3 runs against moto's real HTTP server (tests/core/conftest.py), so requests go through boto3's
full HTTP stack, signing and retries, as they would against MinIO or AWS.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from core import storage
from core.settings import Settings
from core.storage import (
    InvalidKeyError,
    LocalStore,
    MiB,
    ObjectNotFoundError,
    ObjectStore,
    S3Store,
    get_store,
    verify_download_signature,
)

SECRET = "test-secret-key-0123456789"
# S3 (and moto) refuse parts under 5 MiB except the last, so this is the smallest real threshold.
SMALL_THRESHOLD = 5 * MiB


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    if request.param == "local":
        return LocalStore(tmp_path / "objects", SECRET, base_url="http://api.test")
    return S3Store(
        request.getfixturevalue("s3_bucket_name"),
        endpoint_url=request.getfixturevalue("s3_endpoint_url"),
        create_bucket=True,
        multipart_threshold=SMALL_THRESHOLD,
        multipart_chunksize=SMALL_THRESHOLD,
    )


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "objects", SECRET, base_url="http://api.test/")


@pytest.fixture
def s3_store(s3_endpoint_url: str, s3_bucket_name: str) -> S3Store:
    return S3Store(s3_bucket_name, endpoint_url=s3_endpoint_url, create_bucket=True)


# --- behaviour shared by both backends --------------------------------------------------------


def test_bytes_round_trip_and_overwrite(store: ObjectStore) -> None:
    key = storage.upload_key("t1", "file-1")
    assert not store.exists(key)

    store.put_bytes(key, b'{"prompt": "hi"}\n', content_type="application/jsonl")
    assert store.exists(key)
    assert store.get_bytes(key) == b'{"prompt": "hi"}\n'

    store.put_bytes(key, b"replaced")
    assert store.get_bytes(key) == b"replaced"
    assert store.list("files/") == [key]


def test_empty_object_round_trip(store: ObjectStore) -> None:
    store.put_bytes("a/empty", b"")
    assert store.exists("a/empty")
    assert store.get_bytes("a/empty") == b""


def test_file_round_trip_creates_parent_dirs(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "in.bin"
    source.write_bytes(bytes(range(256)) * 10)
    store.put_file("checkpoints/t1/j1/state.bin", source)

    target = tmp_path / "out" / "deep" / "state.bin"
    store.download_file("checkpoints/t1/j1/state.bin", target)
    assert target.read_bytes() == source.read_bytes()


def test_list_is_sorted_and_respects_folder_boundaries(store: ObjectStore) -> None:
    for key in ["files/ab/x.jsonl", "files/a/z.jsonl", "files/a/b.jsonl", "files/a/sub/c.jsonl"]:
        store.put_bytes(key, b"x")
    store.put_bytes("reports/a/j/r.json", b"{}")

    assert store.list("files/a/") == ["files/a/b.jsonl", "files/a/sub/c.jsonl", "files/a/z.jsonl"]
    assert store.list("files/ab/") == ["files/ab/x.jsonl"]
    assert store.list("files/nobody/") == []
    assert store.list("") == [
        "files/a/b.jsonl",
        "files/a/sub/c.jsonl",
        "files/a/z.jsonl",
        "files/ab/x.jsonl",
        "reports/a/j/r.json",
    ]


def test_missing_key_raises_not_found_naming_the_key(store: ObjectStore, tmp_path: Path) -> None:
    key = "files/t1/missing.jsonl"
    with pytest.raises(ObjectNotFoundError, match=re.escape(key)):
        store.get_bytes(key)
    target = tmp_path / "never.bin"
    with pytest.raises(ObjectNotFoundError, match=re.escape(key)):
        store.download_file(key, target)
    assert not target.exists()
    # ObjectNotFoundError is a KeyError so dict-style callers can catch it.
    with pytest.raises(KeyError):
        store.get_bytes(key)


def test_delete_removes_one_object_and_tolerates_missing(store: ObjectStore) -> None:
    store.put_bytes("a/b/one", b"1")
    store.put_bytes("a/b/two", b"2")
    store.delete("a/b/one")
    assert not store.exists("a/b/one")
    assert store.list("a/") == ["a/b/two"]
    store.delete("a/b/one")  # idempotent, like S3's DeleteObject


BAD_KEYS = [
    "",
    "/etc/passwd",
    "../outside",
    "files/../../outside",
    "files/./x",
    "files//x",
    "files/x/",
    "files/a b",
    "files\\..\\x",
    "files/%2e%2e/x",
    "files/ü",
    "files/x\x00",
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_are_rejected_everywhere(store: ObjectStore, tmp_path: Path, key: str) -> None:
    source = tmp_path / "f"
    source.write_bytes(b"x")
    calls = [
        lambda: store.put_bytes(key, b"x"),
        lambda: store.put_file(key, source),
        lambda: store.get_bytes(key),
        lambda: store.download_file(key, tmp_path / "out"),
        lambda: store.exists(key),
        lambda: store.delete(key),
        lambda: store.presigned_url(key, 60),
    ]
    for call in calls:
        with pytest.raises(InvalidKeyError) as caught:
            call()
        assert repr(key) in str(caught.value)
    assert store.list("") == []
    assert not (tmp_path.parent / "outside").exists()


@pytest.mark.parametrize("prefix", ["files", "files/a", "/files/", "../", "files//", "a/../"])
def test_invalid_prefixes_are_rejected(store: ObjectStore, tmp_path: Path, prefix: str) -> None:
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.list(prefix)
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.delete_prefix(prefix)
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.copy_prefix(prefix, "dst/")
    with pytest.raises(InvalidKeyError, match="prefix"):
        store.upload_dir(prefix, tmp_path)


def test_whole_store_prefix_is_for_listing_only(store: ObjectStore) -> None:
    store.put_bytes("a/x", b"x")
    with pytest.raises(InvalidKeyError):
        store.delete_prefix("")
    assert store.exists("a/x")


def _make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "adapter_config.json": b'{"r": 8}',
        "adapter_model.safetensors": b"\x00\x01weights",
        "optimizer/state.pt": b"optim",
        "optimizer/nested/rng.pt": b"rng",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_upload_dir_and_download_dir_round_trip(store: ObjectStore, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "ckpt")
    prefix = storage.checkpoint_prefix("t1", "job-1")

    keys = store.upload_dir(prefix, tmp_path / "ckpt")
    assert keys == sorted(prefix + rel for rel in files)
    assert store.list(prefix) == keys

    paths = store.download_dir(prefix, tmp_path / "restored")
    assert sorted(paths) == sorted(tmp_path / "restored" / rel for rel in files)
    for rel, data in files.items():
        assert (tmp_path / "restored" / rel).read_bytes() == data


def test_upload_dir_with_a_bad_file_name_uploads_nothing(
    store: ObjectStore, tmp_path: Path
) -> None:
    _make_tree(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "bad name.txt").write_bytes(b"x")
    with pytest.raises(InvalidKeyError, match=re.escape("bad name.txt")):
        store.upload_dir("checkpoints/t1/j1/", tmp_path / "ckpt")
    assert store.list("") == []


def test_download_dir_of_missing_prefix_raises(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFoundError, match="checkpoints/t1/none/"):
        store.download_dir("checkpoints/t1/none/", tmp_path / "out")


def test_delete_prefix_removes_only_that_folder(store: ObjectStore, tmp_path: Path) -> None:
    _make_tree(tmp_path / "ckpt")
    store.upload_dir("checkpoints/t1/j1/", tmp_path / "ckpt")
    store.put_bytes("checkpoints/t1/j10/keep", b"k")

    assert store.delete_prefix("checkpoints/t1/j1/") == 4
    assert store.list("checkpoints/") == ["checkpoints/t1/j10/keep"]
    assert store.delete_prefix("checkpoints/t1/j1/") == 0


def test_copy_prefix_copies_and_keeps_the_source(store: ObjectStore, tmp_path: Path) -> None:
    files = _make_tree(tmp_path / "adapter")
    src = storage.quarantine_prefix("t1", "j1")
    dst = storage.released_prefix("t1", "j1")
    store.upload_dir(src, tmp_path / "adapter")

    copied = store.copy_prefix(src, dst)
    assert copied == sorted(dst + rel for rel in files)
    assert store.list(dst) == copied
    assert len(store.list(src)) == len(files)
    for rel, data in files.items():
        assert store.get_bytes(dst + rel) == data


def test_copy_prefix_refuses_missing_or_overlapping_prefixes(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFoundError, match="quarantine/t1/none/"):
        store.copy_prefix("quarantine/t1/none/", "released/t1/none/")
    store.put_bytes("a/b/x", b"x")
    with pytest.raises(InvalidKeyError, match="one contains the other"):
        store.copy_prefix("a/", "a/b/")
    with pytest.raises(InvalidKeyError, match="one contains the other"):
        store.copy_prefix("a/b/", "a/")


def test_large_file_round_trip_over_multipart_threshold(store: ObjectStore, tmp_path: Path) -> None:
    source = tmp_path / "big.bin"
    data = (b"0123456789abcdef" * (SMALL_THRESHOLD // 16)) + b"tail" * 256
    source.write_bytes(data)
    key = "released/t1/j1/adapter_model.safetensors"

    store.put_file(key, source)
    store.download_file(key, tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == data

    if isinstance(store, S3Store):
        # A multipart object's ETag is "<md5 of part md5s>-<part count>".
        etag = store.client.head_object(Bucket=store.bucket, Key=key)["ETag"].strip('"')
        assert etag.endswith("-2")


@pytest.mark.parametrize("expires_in", [0, -5, storage.MAX_URL_EXPIRY_SECONDS + 1])
def test_presigned_url_expiry_bounds(store: ObjectStore, expires_in: int) -> None:
    with pytest.raises(ValueError, match="expires_in"):
        store.presigned_url("a/b", expires_in)


# --- key helpers --------------------------------------------------------------------------------


def test_key_helpers_build_the_documented_layout() -> None:
    assert storage.upload_key("t1", "file-abc") == "files/t1/file-abc.jsonl"
    assert storage.checkpoint_prefix("t1", "j1") == "checkpoints/t1/j1/"
    assert storage.released_prefix("t1", "j1") == "released/t1/j1/"
    assert storage.quarantine_prefix("t1", "j1") == "quarantine/t1/j1/"
    assert storage.report_key("t1", "j1", "audit") == "reports/t1/j1/audit.json"
    for key in [storage.upload_key("t1", "f"), storage.report_key("t1", "j", "risk")]:
        assert storage.validate_key(key) == key


@pytest.mark.parametrize("bad_id", ["", ".", "..", "a/b", "../x", "a b", "ü", "x\n"])
def test_key_helpers_reject_bad_ids(bad_id: str) -> None:
    with pytest.raises(InvalidKeyError, match="tenant id"):
        storage.upload_key(bad_id, "f1")
    with pytest.raises(InvalidKeyError, match="file id"):
        storage.upload_key("t1", bad_id)
    with pytest.raises(InvalidKeyError, match="job id"):
        storage.checkpoint_prefix("t1", bad_id)
    with pytest.raises(InvalidKeyError, match="report name"):
        storage.report_key("t1", "j1", bad_id)


# --- local backend ------------------------------------------------------------------------------


def _url_parts(url: str) -> tuple[str, str, str]:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    return parts.path.removeprefix("/downloads/"), query["expires"][0], query["signature"][0]


def test_local_presigned_url_verifies_and_rejects_tampering(local_store: LocalStore) -> None:
    key = "released/t1/j1/adapter_model.safetensors"
    before = int(time.time())
    url = local_store.presigned_url(key, 600)
    assert url.startswith("http://api.test/downloads/released/t1/j1/adapter_model.safetensors?")

    url_key, expires, signature = _url_parts(url)
    assert url_key == key
    assert before + 600 <= int(expires) <= int(time.time()) + 600
    assert verify_download_signature(SECRET, key, expires, signature)
    assert verify_download_signature(SECRET, key, int(expires), signature)

    assert not verify_download_signature(SECRET, "released/t2/j1/adapter_model.safetensors",
                                         expires, signature)  # fmt: skip
    assert not verify_download_signature(SECRET, key, str(int(expires) + 3600), signature)
    flipped = signature[:-1] + ("1" if signature[-1] == "0" else "0")
    assert not verify_download_signature(SECRET, key, expires, flipped)
    assert not verify_download_signature("another-secret-key-000", key, expires, signature)
    assert not verify_download_signature(SECRET, key, "soon", signature)
    assert not verify_download_signature(SECRET, "../etc/passwd", expires, signature)


def test_local_presigned_url_expires(local_store: LocalStore) -> None:
    key = "released/t1/j1/adapter_config.json"
    _, expires, signature = _url_parts(local_store.presigned_url(key, 60))
    assert verify_download_signature(SECRET, key, expires, signature, now=int(expires) - 1)
    assert not verify_download_signature(SECRET, key, expires, signature, now=int(expires))
    assert not verify_download_signature(SECRET, key, expires, signature, now=int(expires) + 1)


def test_local_signature_matches_documented_formula() -> None:
    import hashlib
    import hmac

    expected = hmac.new(SECRET.encode(), b"a/b\n1700000000", hashlib.sha256).hexdigest()
    assert storage.download_signature(SECRET, "a/b", 1700000000) == expected


def test_local_writes_leave_no_temp_files(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.put_bytes("a/b/c.json", b"{}")
    source = tmp_path / "src"
    source.write_bytes(b"data")
    local_store.put_file("a/b/d.bin", source)
    local_store.download_file("a/b/d.bin", tmp_path / "dl" / "d.bin")

    assert sorted(p.name for p in (local_store.root / "a" / "b").iterdir()) == ["c.json", "d.bin"]
    assert [p.name for p in (tmp_path / "dl").iterdir()] == ["d.bin"]


def test_local_failed_write_keeps_the_old_object(local_store: LocalStore, tmp_path: Path) -> None:
    local_store.put_bytes("a/obj", b"old")
    with pytest.raises(FileNotFoundError):
        local_store.put_file("a/obj", tmp_path / "does-not-exist")
    assert local_store.get_bytes("a/obj") == b"old"
    assert local_store.list("a/") == ["a/obj"]
    assert [p.name for p in (local_store.root / "a").iterdir()] == ["obj"]


def test_local_ignores_stray_files_in_listing(local_store: LocalStore) -> None:
    local_store.put_bytes("a/obj", b"x")
    (local_store.root / "a" / ".obj~tmp~123").write_bytes(b"partial")
    (local_store.root / "a" / "not a key").write_bytes(b"x")
    assert local_store.list("") == ["a/obj"]


def test_local_symlink_escaping_the_root_is_refused(
    local_store: LocalStore, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (local_store.root / "files").mkdir()
    (local_store.root / "files" / "evil").symlink_to(outside)

    with pytest.raises(InvalidKeyError, match="outside the store root"):
        local_store.get_bytes("files/evil/secret")
    with pytest.raises(InvalidKeyError, match="outside the store root"):
        local_store.put_bytes("files/evil/new", b"x")
    assert not (outside / "new").exists()


def test_local_delete_prefix_prunes_empty_folders(local_store: LocalStore) -> None:
    local_store.put_bytes("checkpoints/t1/j1/step-1/state.pt", b"x")
    local_store.put_bytes("checkpoints/t1/j1/step-2/state.pt", b"x")
    local_store.put_bytes("checkpoints/t2/j1/state.pt", b"x")

    assert local_store.delete_prefix("checkpoints/t1/") == 2
    assert not (local_store.root / "checkpoints" / "t1").exists()
    assert (local_store.root / "checkpoints" / "t2" / "j1" / "state.pt").exists()

    local_store.delete("checkpoints/t2/j1/state.pt")
    assert list(local_store.root.iterdir()) == []


# --- S3 backend ---------------------------------------------------------------------------------


def test_s3_presigned_url_downloads_the_object(s3_store: S3Store) -> None:
    key = "released/t1/j1/adapter_model.safetensors"
    store_data = b"\x00weights\xff" * 100
    s3_store.put_bytes(key, store_data)

    url = s3_store.presigned_url(key, 300)
    assert "X-Amz-Expires=300" in url
    response = httpx.get(url)
    assert response.status_code == 200
    assert response.content == store_data


def test_s3_presigned_url_names_the_public_endpoint(
    s3_endpoint_url: str, s3_bucket_name: str
) -> None:
    # Services reach the store as 127.0.0.1, clients as localhost: the link must name the latter
    # and still download (it is signed for that host).
    public = s3_endpoint_url.replace("127.0.0.1", "localhost")
    store = S3Store(
        s3_bucket_name, endpoint_url=s3_endpoint_url, public_endpoint_url=public, create_bucket=True
    )
    store.put_bytes("released/t1/j2/adapter_config.json", b"{}")

    url = store.presigned_url("released/t1/j2/adapter_config.json", 120)
    assert url.startswith(f"{public}/{s3_bucket_name}/released/t1/j2/adapter_config.json?")
    assert httpx.get(url).content == b"{}"


def test_s3_keeps_content_type(s3_store: S3Store) -> None:
    s3_store.put_bytes("reports/t1/j1/audit.json", b"{}", content_type="application/json")
    head = s3_store.client.head_object(Bucket=s3_store.bucket, Key="reports/t1/j1/audit.json")
    assert head["ContentType"] == "application/json"


def test_s3_delete_prefix_batches_requests(
    s3_store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for i in range(5):
        s3_store.put_bytes(f"checkpoints/t1/j1/part-{i}", b"x")
    batches: list[int] = []
    real_delete = s3_store.client.delete_objects

    def counting_delete(**kwargs: object) -> object:
        batches.append(len(kwargs["Delete"]["Objects"]))  # type: ignore[index]
        return real_delete(**kwargs)

    monkeypatch.setattr(storage, "S3_DELETE_BATCH", 2)
    monkeypatch.setattr(s3_store.client, "delete_objects", counting_delete)
    assert s3_store.delete_prefix("checkpoints/t1/j1/") == 5
    assert batches == [2, 2, 1]
    assert s3_store.list("") == []


def test_s3_list_paginates(s3_store: S3Store) -> None:
    keys = [f"files/t1/f{i:02d}.jsonl" for i in range(7)]
    for key in keys:
        s3_store.put_bytes(key, b"x")
    paginator = s3_store.client.get_paginator("list_objects_v2")
    pages = list(
        paginator.paginate(
            Bucket=s3_store.bucket, Prefix="files/", PaginationConfig={"PageSize": 3}
        )
    )
    assert len(pages) == 3  # the server really pages; list() must follow the continuation
    assert s3_store.list("files/t1/") == keys


def test_s3_ensure_bucket_is_idempotent_outside_us_east_1(
    s3_endpoint_url: str, s3_bucket_name: str
) -> None:
    store = S3Store(s3_bucket_name, endpoint_url=s3_endpoint_url, region="eu-west-1")
    store.ensure_bucket()
    store.ensure_bucket()
    location = store.client.get_bucket_location(Bucket=s3_bucket_name)["LocationConstraint"]
    assert location == "eu-west-1"
    store.put_bytes("a/b", b"x")
    assert store.get_bytes("a/b") == b"x"


def test_s3_missing_bucket_says_what_to_do(s3_endpoint_url: str, s3_bucket_name: str) -> None:
    store = S3Store(s3_bucket_name, endpoint_url=s3_endpoint_url)
    with pytest.raises(RuntimeError, match=f"bucket '{s3_bucket_name}' does not exist"):
        store.get_bytes("a/b")


# --- factory ------------------------------------------------------------------------------------


def test_get_store_builds_the_configured_backend(
    tmp_path: Path, s3_endpoint_url: str, s3_bucket_name: str
) -> None:
    local = get_store(Settings(data_dir=tmp_path, secret_key=SECRET))
    assert isinstance(local, LocalStore)
    assert local.root == (tmp_path / "objects").resolve()
    assert local.presigned_url("a/b", 60).startswith("http://127.0.0.1:8000/downloads/a/b?")

    custom = get_store(
        Settings(data_dir=tmp_path, storage_local_dir=tmp_path / "elsewhere", secret_key=SECRET),
        public_base_url="https://tether.example/",
    )
    assert isinstance(custom, LocalStore)
    assert custom.root == (tmp_path / "elsewhere").resolve()
    assert custom.presigned_url("a/b", 60).startswith("https://tether.example/downloads/a/b?")

    s3 = get_store(
        Settings(
            storage_backend="s3",
            s3_bucket=s3_bucket_name,
            s3_endpoint_url=s3_endpoint_url,
            secret_key=SECRET,
        )
    )
    assert isinstance(s3, S3Store)
    assert s3.bucket == s3_bucket_name
    s3.ensure_bucket()
    s3.put_bytes("a/b", b"x")
    assert s3.get_bytes("a/b") == b"x"
