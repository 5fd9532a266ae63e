"""Object storage for uploaded files, checkpoints, adapters and audit reports.

One interface, :class:`ObjectStore`, with two backends:

* :class:`LocalStore`: a directory on disk, the embedded default. Writes are atomic and every key
  is checked to stay under the root. Download links are HMAC-signed, expiring URLs that the API
  serves and checks with :func:`verify_download_signature`.
* :class:`S3Store`: S3 through boto3 (standard retries, endpoint override for MinIO or moto,
  multipart transfers for large objects, presigned GET URLs).

Tenants never name a path: the service builds every key from ids with the key helpers below
(:func:`upload_key`, :func:`checkpoint_prefix`, ...), and every key or prefix that reaches a store
is validated in one place (:func:`validate_key`, :func:`validate_prefix`).

Prefixes are folder-like: they end with ``/`` so that ``files/a/`` never matches ``files/ab/``.
"""

from __future__ import annotations

import abc
import builtins
import contextlib
import hashlib
import hmac
import io
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from core.settings import Settings

MiB = 1024 * 1024
#: Longest lifetime of a download link; S3 SigV4 refuses more than seven days.
MAX_URL_EXPIRY_SECONDS = 7 * 24 * 3600
#: Where local download links point unless the caller names the public API address.
DEFAULT_PUBLIC_BASE_URL = "http://127.0.0.1:8000"
#: Most keys one S3 DeleteObjects request accepts.
S3_DELETE_BATCH = 1000

_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
# Temporary files of atomic writes carry a character that no valid key contains, so a crashed
# write can never show up in list() or be read back as an object.
_TMP_MARKER = "~tmp~"


class ObjectNotFoundError(KeyError):
    """No object is stored under the key (or nothing under the prefix)."""

    def __str__(self) -> str:
        # KeyError's default str() is the repr of its argument; keep the message readable.
        return str(self.args[0]) if self.args else "object not found"


class InvalidKeyError(ValueError):
    """A key, prefix or id segment breaks the key rules."""


# --- key rules ------------------------------------------------------------------------------


def _check_segments(text: str, what: str, original: str) -> None:
    for segment in text.split("/"):
        if not segment:
            raise InvalidKeyError(
                f"{what} {original!r} has an empty segment; keys look like 'files/tenant/id.jsonl'"
            )
        if segment in (".", ".."):
            raise InvalidKeyError(f"{what} {original!r} contains {segment!r}; keys are relative")
        if not _SEGMENT_RE.fullmatch(segment):
            raise InvalidKeyError(
                f"{what} {original!r} has segment {segment!r}; segments may only use "
                "letters, digits, '.', '_' and '-'"
            )


def validate_key(key: str) -> str:
    """Check that ``key`` names an object and return it unchanged.

    A key is relative, '/'-separated, each segment matching ``[A-Za-z0-9._-]+`` and none of them
    ``.`` or ``..``; no leading or trailing '/', no empty segment.

    Raises:
        InvalidKeyError: naming the key and the rule it breaks.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKeyError(f"key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise InvalidKeyError(f"key {key!r} starts with '/'; keys are relative")
    _check_segments(key, "key", key)
    return key


def _is_valid_key(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def validate_prefix(prefix: str, *, allow_empty: bool = False) -> str:
    """Check that ``prefix`` is a folder-like prefix (``a/b/``) and return it unchanged.

    Args:
        prefix: the prefix; it must end with '/' so that ``files/a/`` cannot match ``files/ab/``.
        allow_empty: accept ``""`` (the whole store), for read-only listing.

    Raises:
        InvalidKeyError: naming the prefix and the rule it breaks.
    """
    if prefix == "" and allow_empty:
        return prefix
    if not isinstance(prefix, str) or not prefix.endswith("/"):
        raise InvalidKeyError(f"prefix {prefix!r} must end with '/', e.g. 'checkpoints/t1/j1/'")
    if prefix.startswith("/"):
        raise InvalidKeyError(f"prefix {prefix!r} starts with '/'; prefixes are relative")
    _check_segments(prefix[:-1], "prefix", prefix)
    return prefix


def _segment(name: str, value: str) -> str:
    if not isinstance(value, str) or not _SEGMENT_RE.fullmatch(value) or value in (".", ".."):
        raise InvalidKeyError(
            f"{name} {value!r} cannot be used in a storage key; ids may only use letters, "
            "digits, '.', '_' and '-'"
        )
    return value


# --- key helpers: the only way the service names objects --------------------------------------


def upload_key(tenant: str, file_id: str) -> str:
    """Key of an uploaded training file: ``files/{tenant}/{file_id}.jsonl``."""
    return f"files/{_segment('tenant id', tenant)}/{_segment('file id', file_id)}.jsonl"


def checkpoint_prefix(tenant: str, job: str) -> str:
    """Prefix of a job's training checkpoints: ``checkpoints/{tenant}/{job}/``."""
    return f"checkpoints/{_segment('tenant id', tenant)}/{_segment('job id', job)}/"


def released_prefix(tenant: str, job: str) -> str:
    """Prefix of an adapter that passed the audit: ``released/{tenant}/{job}/``."""
    return f"released/{_segment('tenant id', tenant)}/{_segment('job id', job)}/"


def quarantine_prefix(tenant: str, job: str) -> str:
    """Prefix of an adapter that failed the audit: ``quarantine/{tenant}/{job}/``."""
    return f"quarantine/{_segment('tenant id', tenant)}/{_segment('job id', job)}/"


def report_key(tenant: str, job: str, name: str) -> str:
    """Key of a job report (risk, audit): ``reports/{tenant}/{job}/{name}.json``."""
    return (
        f"reports/{_segment('tenant id', tenant)}/{_segment('job id', job)}/"
        f"{_segment('report name', name)}.json"
    )


def _check_expiry(expires_in: int) -> int:
    if not 1 <= expires_in <= MAX_URL_EXPIRY_SECONDS:
        raise ValueError(
            f"expires_in must be between 1 and {MAX_URL_EXPIRY_SECONDS} seconds, got {expires_in}"
        )
    return expires_in


def _check_disjoint(src: str, dst: str) -> None:
    if src.startswith(dst) or dst.startswith(src):
        raise InvalidKeyError(f"cannot copy prefix {src!r} to {dst!r}: one contains the other")


def _mkstemp_beside(path: Path) -> tuple[int, str]:
    """Create a temp file in ``path``'s folder (created if missing) for an atomic replace."""
    for _ in range(3):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARKER}")
        except FileNotFoundError:
            continue  # a concurrent delete pruned the folder we just made; make it again
    return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{_TMP_MARKER}")


def _files_under(directory: Path) -> list[tuple[Path, str]]:
    """Every regular file under ``directory`` with its '/'-joined relative path, sorted."""
    if not directory.is_dir():
        raise NotADirectoryError(f"upload_dir needs a directory, got {str(directory)!r}")
    return sorted(
        (path, path.relative_to(directory).as_posix())
        for path in directory.rglob("*")
        if path.is_file()
    )


# --- the interface --------------------------------------------------------------------------


class ObjectStore(abc.ABC):
    """Where Tether keeps objects; keys come from the key helpers of this module."""

    @abc.abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Store ``data`` under ``key``, replacing any object already there.

        Args:
            key: a valid key (see :func:`validate_key`).
            data: the object's content.
            content_type: MIME type kept as object metadata (S3); the local store ignores it.
        """

    @abc.abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Store the file at ``path`` under ``key`` (multipart on S3 when large)."""

    @abc.abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The content of the object under ``key``.

        Raises:
            ObjectNotFoundError: when no object has that key.
        """

    @abc.abstractmethod
    def download_file(self, key: str, path: Path) -> None:
        """Write the object under ``key`` to ``path``, creating parent directories.

        Raises:
            ObjectNotFoundError: when no object has that key.
        """

    @abc.abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored under ``key``."""

    @abc.abstractmethod
    def list(self, prefix: str) -> builtins.list[str]:
        """Sorted keys of every object under ``prefix`` (``""`` lists the whole store)."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Delete the object under ``key``; deleting a missing key is not an error."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every object under ``prefix`` and return how many there were."""

    @abc.abstractmethod
    def presigned_url(self, key: str, expires_in: int) -> str:
        """A URL that downloads the object under ``key`` for ``expires_in`` seconds.

        The object's existence is not checked; a link to a missing key fails when fetched.
        """

    @abc.abstractmethod
    def _copy(self, src_key: str, dst_key: str) -> None:
        """Copy one object inside the store."""

    def upload_dir(self, prefix: str, directory: Path) -> builtins.list[str]:
        """Store every file under ``directory`` at ``prefix`` + its relative path.

        All keys are checked before anything is written, so a bad file name uploads nothing.

        Returns:
            The keys written, sorted.

        Raises:
            InvalidKeyError: when a relative path does not make a valid key.
        """
        validate_prefix(prefix)
        files = [(path, validate_key(prefix + rel)) for path, rel in _files_under(Path(directory))]
        for path, key in files:
            self.put_file(key, path)
        return [key for _, key in files]

    def download_dir(self, prefix: str, directory: Path) -> builtins.list[Path]:
        """Write every object under ``prefix`` into ``directory`` at its relative path.

        Returns:
            The paths written, in key order.

        Raises:
            ObjectNotFoundError: when nothing is stored under ``prefix`` (a missing checkpoint or
                adapter should fail loudly, not yield an empty directory).
        """
        keys = self.list(validate_prefix(prefix))
        if not keys:
            raise ObjectNotFoundError(f"no objects under prefix {prefix!r}")
        paths = []
        for key in keys:
            path = Path(directory).joinpath(*key[len(prefix) :].split("/"))
            self.download_file(key, path)
            paths.append(path)
        return paths

    def copy_prefix(self, src: str, dst: str) -> builtins.list[str]:
        """Copy every object under ``src`` to the same relative key under ``dst``.

        Used to release a quarantined adapter on an operator override; the source is kept.

        Returns:
            The destination keys, sorted.

        Raises:
            ObjectNotFoundError: when nothing is stored under ``src``.
            InvalidKeyError: when one prefix contains the other.
        """
        validate_prefix(src)
        validate_prefix(dst)
        _check_disjoint(src, dst)
        keys = self.list(src)
        if not keys:
            raise ObjectNotFoundError(f"no objects under prefix {src!r}")
        copied = []
        for key in keys:
            target = dst + key[len(src) :]
            self._copy(key, target)
            copied.append(target)
        return copied


# --- local directory ------------------------------------------------------------------------


def download_signature(secret_key: str, key: str, expires: int) -> str:
    """Hex HMAC-SHA256 of ``f"{key}\\n{expires}"`` under ``secret_key``."""
    message = f"{key}\n{expires}".encode()
    return hmac.new(secret_key.encode(), message, hashlib.sha256).hexdigest()


def verify_download_signature(
    secret_key: str,
    key: str,
    expires: int | str,
    signature: str,
    now: float | None = None,
) -> bool:
    """Whether a local download link is authentic and still valid.

    Args:
        secret_key: the deployment's ``secret_key``.
        key: the object key from the URL path.
        expires: the ``expires`` query value (unix seconds; a string straight from the URL is fine).
        signature: the ``signature`` query value (hex).
        now: the current unix time; defaults to ``time.time()``.

    Returns:
        True when the signature matches (compared in constant time) and ``now < expires``;
        False for a tampered key or expiry, a malformed value or an expired link.
    """
    try:
        expires_at = int(expires)
        validate_key(key)
    except (TypeError, ValueError):
        return False
    if (time.time() if now is None else now) >= expires_at:
        return False
    expected = download_signature(secret_key, key, expires_at)
    return hmac.compare_digest(expected.encode(), str(signature).encode())


class LocalStore(ObjectStore):
    """Objects as files under ``root``; the embedded default.

    Args:
        root: directory holding the objects (created if missing).
        secret_key: signs download links; the API verifies them with the same key.
        base_url: public address of the API that serves ``/downloads/{key}``.
    """

    def __init__(self, root: Path, secret_key: str, base_url: str = "") -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret_key = secret_key
        self.base_url = base_url.rstrip("/")

    def __repr__(self) -> str:
        return f"LocalStore(root={str(self.root)!r})"

    def path_for(self, key: str) -> Path:
        """The file that holds ``key``; the API uses it to serve verified downloads.

        Raises:
            InvalidKeyError: when the key is invalid or resolves outside the root (a symlink).
        """
        path = self.root.joinpath(*validate_key(key).split("/")).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKeyError(f"key {key!r} resolves outside the store root")
        return path

    def _dir_for(self, prefix: str) -> Path:
        if prefix == "":
            return self.root
        path = self.root.joinpath(*prefix[:-1].split("/")).resolve()
        if not path.is_relative_to(self.root):
            raise InvalidKeyError(f"prefix {prefix!r} resolves outside the store root")
        return path

    @contextlib.contextmanager
    def _atomic_target(self, key: str) -> Iterator[Path]:
        """A temp path in the key's directory, moved onto the key only if the block succeeds."""
        path = self.path_for(key)
        fd, tmp_name = _mkstemp_beside(path)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _existing(self, key: str) -> Path:
        path = self.path_for(key)
        if not path.is_file():
            raise ObjectNotFoundError(f"no object under key {key!r}")
        return path

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self._atomic_target(key) as tmp:
            tmp.write_bytes(data)

    def put_file(self, key: str, path: Path) -> None:
        with self._atomic_target(key) as tmp:
            shutil.copyfile(path, tmp)

    def get_bytes(self, key: str) -> bytes:
        return self._existing(key).read_bytes()

    def download_file(self, key: str, path: Path) -> None:
        source = self._existing(key)
        target = Path(path)
        fd, tmp_name = _mkstemp_beside(target)
        os.close(fd)
        try:
            shutil.copyfile(source, tmp_name)
            os.replace(tmp_name, target)
        finally:
            Path(tmp_name).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def list(self, prefix: str) -> builtins.list[str]:
        directory = self._dir_for(validate_prefix(prefix, allow_empty=True))
        if not directory.is_dir():
            return []
        keys: builtins.list[str] = []
        for path in directory.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            # Skip temp files of writes in progress and anything not written through the store.
            if path.is_file() and _is_valid_key(key) and key.startswith(prefix):
                keys.append(key)
        return sorted(keys)

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        path.unlink(missing_ok=True)
        self._prune_upwards(path.parent)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(validate_prefix(prefix))
        for key in keys:
            self.path_for(key).unlink(missing_ok=True)
        directory = self._dir_for(prefix)
        if directory.is_dir():
            for folder in sorted((p for p in directory.rglob("*") if p.is_dir()), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        self._prune_upwards(directory)
        return len(keys)

    def _prune_upwards(self, directory: Path) -> None:
        # Remove now-empty folders up to the root so deleted objects leave no trace; a folder a
        # concurrent writer has just filled is left alone (rmdir fails on a non-empty folder).
        while directory != self.root and directory.is_relative_to(self.root):
            try:
                directory.rmdir()
            except OSError:
                return
            directory = directory.parent

    def presigned_url(self, key: str, expires_in: int) -> str:
        validate_key(key)
        expires = int(time.time()) + _check_expiry(expires_in)
        signature = download_signature(self._secret_key, key, expires)
        return f"{self.base_url}/downloads/{key}?expires={expires}&signature={signature}"

    def _copy(self, src_key: str, dst_key: str) -> None:
        self.put_file(dst_key, self._existing(src_key))


# --- S3 -------------------------------------------------------------------------------------

_NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}


def _error_code(error: Exception) -> str:
    response: dict[str, Any] = getattr(error, "response", {}) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(ObjectStore):
    """Objects in an S3 bucket (AWS, MinIO, moto).

    Credentials come from the standard AWS chain (environment, config files, instance role); this
    class never reads or logs them.

    Args:
        bucket: the bucket name.
        endpoint_url: override for S3-compatible servers; path-style addressing is used with it,
            since MinIO and moto rarely have wildcard DNS for virtual-host buckets.
        region: the bucket's region.
        create_bucket: call :meth:`ensure_bucket` now.
        multipart_threshold: objects at least this large go up in parts (S3's minimum part size
            is 5 MiB, so smaller chunk sizes are raised to it by boto3).
        multipart_chunksize: size of each part.
        public_endpoint_url: the address clients outside the service's network reach the store
            at (``http://127.0.0.1:9000`` for a compose stack whose services say
            ``http://minio:9000``); presigned URLs are signed for it, since SigV4 signs the host.
            Default: ``endpoint_url``.
    """

    def __init__(
        self,
        bucket: str,
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        create_bucket: bool = False,
        *,
        public_endpoint_url: str | None = None,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
    ) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        self.bucket = bucket
        self.region = region
        self.endpoint_url = endpoint_url
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            signature_version="s3v4",
            s3={"addressing_style": "path"} if endpoint_url else {},
        )
        # A private session keeps this client independent of boto3's global default session.
        session = boto3.session.Session()
        self.client = session.client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )
        # Signing a URL makes no request, so the public client never needs to be reachable here.
        self.public_endpoint_url = public_endpoint_url or endpoint_url
        self._presign_client = (
            self.client
            if self.public_endpoint_url == endpoint_url
            else session.client(
                "s3",
                endpoint_url=self.public_endpoint_url,
                region_name=region,
                config=config.merge(Config(s3={"addressing_style": "path"})),
            )
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold, multipart_chunksize=multipart_chunksize
        )
        if create_bucket:
            self.ensure_bucket()

    def __repr__(self) -> str:
        return f"S3Store(bucket={self.bucket!r}, endpoint_url={self.endpoint_url!r})"

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (idempotent)."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except self.client.exceptions.ClientError as error:
            if _error_code(error) not in _NOT_FOUND_CODES | {"NoSuchBucket"}:
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        # us-east-1 is the one region that rejects an explicit LocationConstraint.
        if self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        # Another process may create it between our check and our create.
        with contextlib.suppress(self.client.exceptions.BucketAlreadyOwnedByYou):
            self.client.create_bucket(**kwargs)

    @contextlib.contextmanager
    def _not_found_as(self, key: str) -> Iterator[None]:
        try:
            yield
        except self.client.exceptions.ClientError as error:
            code = _error_code(error)
            if code == "NoSuchBucket":
                raise RuntimeError(
                    f"S3 bucket {self.bucket!r} does not exist; create it with `tether setup` "
                    "or set TETHER_S3_BUCKET"
                ) from error
            if code in _NOT_FOUND_CODES:
                raise ObjectNotFoundError(f"no object under key {key!r}") from error
            raise

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else None
        self.client.upload_fileobj(
            io.BytesIO(data),
            self.bucket,
            validate_key(key),
            ExtraArgs=extra,
            Config=self.transfer_config,
        )

    def put_file(self, key: str, path: Path) -> None:
        self.client.upload_file(
            str(path), self.bucket, validate_key(key), Config=self.transfer_config
        )

    def get_bytes(self, key: str) -> bytes:
        with self._not_found_as(key):
            response = self.client.get_object(Bucket=self.bucket, Key=validate_key(key))
        body: bytes = response["Body"].read()
        return body

    def download_file(self, key: str, path: Path) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # boto3 writes to a temporary name and renames it, so a failed download leaves no file.
        with self._not_found_as(key):
            self.client.download_file(
                self.bucket, validate_key(key), str(target), Config=self.transfer_config
            )

    def exists(self, key: str) -> bool:
        try:
            with self._not_found_as(key):
                self.client.head_object(Bucket=self.bucket, Key=validate_key(key))
        except ObjectNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> builtins.list[str]:
        validate_prefix(prefix, allow_empty=True)
        paginator = self.client.get_paginator("list_objects_v2")
        keys: builtins.list[str] = []
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=validate_key(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(validate_prefix(prefix))
        batch_size = S3_DELETE_BATCH  # read at call time so tests can shrink it
        for start in range(0, len(keys), batch_size):
            batch = keys[start : start + batch_size]
            response = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True},
            )
            if errors := response.get("Errors"):
                first = errors[0]
                raise RuntimeError(
                    f"S3 refused to delete {len(errors)} object(s) under {prefix!r}, e.g. "
                    f"{first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def presigned_url(self, key: str, expires_in: int) -> str:
        url: str = self._presign_client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": validate_key(key)},
            ExpiresIn=_check_expiry(expires_in),
        )
        return url

    def _copy(self, src_key: str, dst_key: str) -> None:
        # Managed copy: server-side, and multipart for objects over the single-copy limit.
        with self._not_found_as(src_key):
            self.client.copy(
                {"Bucket": self.bucket, "Key": validate_key(src_key)},
                self.bucket,
                validate_key(dst_key),
                Config=self.transfer_config,
            )


def get_store(settings: Settings, public_base_url: str = DEFAULT_PUBLIC_BASE_URL) -> ObjectStore:
    """The object store that ``settings`` configure.

    Args:
        settings: the deployment settings (``storage_backend`` and its fields, ``secret_key``).
        public_base_url: address of the API, where local download links point.
    """
    if settings.storage_backend == "s3":
        return S3Store(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            public_endpoint_url=settings.s3_public_endpoint_url,
        )
    return LocalStore(settings.resolved_storage_dir, settings.secret_key, base_url=public_base_url)
