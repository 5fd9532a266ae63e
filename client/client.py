"""The Tether Python SDK: a thin, typed-error client of the native REST API.

It depends on httpx and the standard library only (tqdm is used for progress bars when it is
installed), so it ships without the server. Objects come back as the JSON dictionaries the API
documents (``GET /docs``)::

    from client import Client

    with Client("http://127.0.0.1:8000", api_key="tth_...") as tether:
        file = tether.files.upload("train.jsonl")
        job = tether.jobs.create("tiny-random", file["id"], preset="adaptive")
        job = tether.jobs.wait(job["id"])
        if job["status"] == "succeeded":
            tether.jobs.download_adapter(job["id"], "adapter/")

Retries: GET requests and POSTs that carry an ``Idempotency-Key`` are retried with exponential
backoff on 502/503/504 and on connection errors; any other POST is sent once, since sending it
again could create a second object.
"""

from __future__ import annotations

import builtins
import json
import os
import random
import tempfile
import time
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from client.errors import ConnectionFailed, NotFound, ServerError, TetherError, error_from_response

Json = dict[str, Any]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: Statuses a proxy or a restarting server answers with; safe to retry for idempotent requests.
RETRY_STATUSES = frozenset({502, 503, 504})
#: Job statuses after which nothing changes any more.
TERMINAL_STATUSES = frozenset({"succeeded", "rejected", "failed", "cancelled"})
#: Longest pause between two retries, whatever the backoff or a Retry-After header says.
MAX_RETRY_DELAY = 30.0


def _user_agent() -> str:
    try:
        version = metadata.version("tether")
    except metadata.PackageNotFoundError:
        version = "0.0.0"
    return f"tether-python/{version}"


class Client:
    """A connection to a Tether API server.

    Args:
        base_url: the API's address; default ``$TETHER_API_URL``, else ``http://127.0.0.1:8000``.
        api_key: a tenant key (``tth_...``); default ``$TETHER_API_KEY``.
        timeout: seconds for connecting and for each read.
        max_retries: further attempts of an idempotent request after a 502/503/504 or a
            connection error (0 disables retries).
        backoff: the first retry waits about this many seconds; each next one twice as long.

    Raises:
        ValueError: no API key was given or found in the environment.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 3,
        backoff: float = 0.5,
    ) -> None:
        api_key = api_key or os.environ.get("TETHER_API_KEY")
        if not api_key:
            raise ValueError(
                "no API key: pass api_key= or set TETHER_API_KEY (an operator creates one with "
                "`tether keys create --tenant NAME`)"
            )
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = (base_url or os.environ.get("TETHER_API_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self._http = httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": _user_agent()},
            timeout=timeout,
        )
        self.files = Files(self)
        self.jobs = Jobs(self)

    def __repr__(self) -> str:
        return f"Client(base_url={self.base_url!r})"

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        json_body: Any = None,
        files: Any = None,
        data: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send one API request and return its decoded JSON body.

        Args:
            method: HTTP method.
            path: path under the base URL, e.g. ``/jobs``.
            idempotency_key: sent as ``Idempotency-Key``; makes a POST safe to retry.

        Raises:
            TetherError: the subclass for the status code (``NotFound``, ``Conflict``...), or
                ``ConnectionFailed`` when the server could not be reached.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        idempotent = method.upper() == "GET" or idempotency_key is not None
        response = self._send(
            lambda: self._http.request(
                method, path, params=params, json=json_body, files=files, data=data, headers=headers
            ),
            idempotent=idempotent,
        )
        if response.status_code >= 400:
            raise _error(response)
        return response.json()

    def _send(self, send: Any, *, idempotent: bool) -> httpx.Response:
        attempts = self.max_retries + 1 if idempotent else 1
        for attempt in range(attempts):
            final = attempt == attempts - 1
            response: httpx.Response | None = None
            try:
                response = send()
            except httpx.TransportError as error:
                if final:
                    raise ConnectionFailed(
                        0, "connection_error", f"could not reach {self.base_url}: {error}"
                    ) from error
            else:
                if response.status_code not in RETRY_STATUSES or final:
                    return response
            time.sleep(self._delay(attempt, response))
        raise AssertionError("unreachable")  # pragma: no cover

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        hint = response.headers.get("retry-after") if response is not None else None
        if hint is not None and hint.replace(".", "", 1).isdigit():
            return min(float(hint), MAX_RETRY_DELAY)
        # Full jitter: clients that failed together do not retry together.
        return min(self.backoff * 2**attempt, MAX_RETRY_DELAY) * random.uniform(0.5, 1.0)

    def _download(self, url: str, target: Path) -> None:
        """Fetch an absolute (presigned) URL into ``target``, atomically, without our API key."""

        def send() -> httpx.Response:
            # Presigned links carry their own authorisation; an S3 host must not get our key.
            with httpx.stream("GET", url, timeout=self.timeout, follow_redirects=True) as response:
                if response.status_code >= 400:
                    response.read()
                    return response
                fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
                try:
                    with os.fdopen(fd, "wb") as out:
                        for chunk in response.iter_bytes():
                            out.write(chunk)
                    os.replace(tmp, target)
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise
                return response

        response = self._send(send, idempotent=True)
        if response.status_code >= 400:
            raise _error(response)


def _error(response: httpx.Response) -> TetherError:
    try:
        body: Any = response.json()
    except ValueError:
        body = response.text
    return error_from_response(response.status_code, body, response.headers)


def _pages(client: Client, path: str, params: dict[str, Any], limit: int | None) -> Iterator[Json]:
    """Items of a cursor-paginated list (``has_more`` / ``next_cursor``), at most ``limit``."""
    yielded = 0
    while True:
        page = client.request("GET", path, params=params)
        for item in page["data"]:
            if limit is not None and yielded >= limit:
                return
            yield item
            yielded += 1
        if not page.get("has_more") or not page.get("next_cursor"):
            return
        params = {**params, "after": page["next_cursor"]}


class Files:
    """Training files: ``client.files``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def upload(
        self,
        file: str | os.PathLike[str] | bytes,
        *,
        filename: str | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        """Upload a JSONL training file; the server validates every line.

        Args:
            file: a path, or the file's bytes.
            filename: the name to show (default: the path's name, or ``upload.jsonl``).
            idempotency_key: makes the upload safe to retry (the same key and content return
                the same file).

        Raises:
            ValidationFailed: the file has problems; ``details`` lists each with its line.
            PayloadTooLarge: the file is over the server's size or example limit.
        """
        if isinstance(file, bytes):
            content, name = file, filename or "upload.jsonl"
        else:
            path = Path(file)
            content, name = path.read_bytes(), filename or path.name
        return self._client.request(
            "POST",
            "/files",
            files={"file": (name, content, "application/jsonl")},
            data={"purpose": "fine-tune"},
            idempotency_key=idempotency_key,
        )

    def get(self, file_id: str) -> Json:
        """One file's metadata."""
        return self._client.request("GET", f"/files/{file_id}")

    def list(self, *, limit: int | None = None, page_size: int = 20) -> Iterator[Json]:
        """The tenant's files, newest first, fetched page by page (at most ``limit``)."""
        return _pages(self._client, "/files", {"limit": page_size}, limit)


class Jobs:
    """Fine-tuning jobs: ``client.jobs``."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self,
        model: str,
        training_file: str,
        *,
        preset: str = "adaptive",
        hyperparameters: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Json:
        """Submit a job.

        Args:
            model: base model id (``GET /models``).
            training_file: id of an uploaded file (``file-...``).
            preset: safety preset: ``off``, ``fixed``, ``paper`` or ``adaptive``.
            hyperparameters: e.g. ``{"lora": {"r": 8}, "max_steps": 20, "learning_rate": 1e-4}``.
            idempotency_key: makes the submission safe to retry.

        Raises:
            NotFound: unknown model or training file.
            RateLimited: the tenant has its maximum of unfinished jobs.
            ValidationFailed: an invalid preset or hyperparameter.
        """
        body: Json = {"model": model, "training_file": training_file, "preset": preset}
        if hyperparameters is not None:
            body["hyperparameters"] = hyperparameters
        return self._client.request(
            "POST", "/jobs", json_body=body, idempotency_key=idempotency_key
        )

    def get(self, job_id: str) -> Json:
        """One job."""
        return self._client.request("GET", f"/jobs/{job_id}")

    def list(
        self, *, status: str | None = None, limit: int | None = None, page_size: int = 20
    ) -> Iterator[Json]:
        """The tenant's jobs, newest first, fetched page by page.

        Args:
            status: keep jobs in this status only.
            limit: stop after this many jobs (default: all).
            page_size: jobs per request (1..100).
        """
        params: dict[str, Any] = {"limit": page_size}
        if status is not None:
            params["status"] = status
        return _pages(self._client, "/jobs", params, limit)

    def cancel(self, job_id: str) -> Json:
        """Cancel a job (at once if no worker holds it yet, else at the worker's next check).

        Raises:
            Conflict: the job has finished already.
        """
        return self._client.request("POST", f"/jobs/{job_id}/cancel")

    def events(self, job_id: str, *, after: int | None = None) -> builtins.list[Json]:
        """Every event of a job, oldest first; with ``after``, those newer than that event id."""
        events: list[Json] = []
        cursor = after
        while True:
            params: dict[str, Any] = {"limit": 1000}
            if cursor is not None:
                params["after"] = cursor
            page = self._client.request("GET", f"/jobs/{job_id}/events", params=params)
            events.extend(page["data"])
            if not page["has_more"] or not page["data"]:
                return events
            cursor = page["next_cursor"]

    def stream_events(self, job_id: str, *, after: int | None = None) -> Iterator[Json]:
        """Follow a job's events live (server-sent events) until the job finishes.

        A dropped connection is resumed from the last event seen, up to ``max_retries`` times
        in a row.

        Raises:
            NotFound: no such job.
            ConnectionFailed: the stream could not be (re-)opened.
        """
        for event in self._follow(job_id, after, deadline=None):
            if event is not None:
                yield event

    def _follow(
        self, job_id: str, after: int | None, deadline: float | None
    ) -> Iterator[Json | None]:
        """Events as they come, and ``None`` for each keep-alive (so callers can check time)."""
        cursor = after
        failures = 0
        while True:
            params: dict[str, Any] = {"stream": "true"}
            if cursor is not None:
                params["after"] = cursor
            try:
                with self._client._http.stream(
                    "GET",
                    f"/jobs/{job_id}/events",
                    params=params,
                    headers={"Accept": "text/event-stream"},
                    timeout=self._stream_timeout(deadline),
                ) as response:
                    if response.status_code >= 400:
                        response.read()
                        raise _error(response)
                    for kind, data in parse_sse(response.iter_lines()):
                        if kind == "end":
                            return
                        if kind == "message":
                            event: Json = json.loads(data)
                            cursor = event["id"]
                            failures = 0
                            yield event
                        else:
                            yield None
                        _check_deadline(deadline, job_id)
            except httpx.TransportError as error:
                _check_deadline(deadline, job_id)  # a read that timed out at the deadline
                failures += 1
                if failures > self._client.max_retries:
                    raise ConnectionFailed(
                        0, "connection_error", f"the event stream of {job_id} broke: {error}"
                    ) from error
                time.sleep(self._client._delay(failures - 1, None))
            _check_deadline(deadline, job_id)
            # The stream ended without its `end` event (a restarting server): resume.

    def _stream_timeout(self, deadline: float | None) -> httpx.Timeout:
        # The server sends a keep-alive only every 15 s: without a shorter read timeout a
        # quiet job would hold wait() well past its deadline.
        read = self._client.timeout
        if deadline is not None:
            read = min(read, max(0.05, deadline - time.monotonic()))
        return httpx.Timeout(self._client.timeout, read=read)

    def wait(
        self,
        job_id: str,
        *,
        progress: bool = True,
        timeout: float | None = None,
        poll_interval: float = 2.0,
    ) -> Json:
        """Block until the job finishes and return it in its final state.

        Progress comes from the event stream (a tqdm bar on stderr when ``progress`` and tqdm
        is installed); if the stream cannot be used (a proxy that breaks server-sent events,
        a server error), the job is polled every ``poll_interval`` seconds instead.

        Raises:
            TimeoutError: the job had not finished after ``timeout`` seconds.
            NotFound: no such job.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        bar = _ProgressBar(job_id, enabled=progress)
        try:
            try:
                for event in self._follow(job_id, None, deadline):
                    if event is not None:
                        bar.event(event)
            except NotFound:
                raise
            except (ServerError, ConnectionFailed, ValueError, KeyError, httpx.HTTPError):
                pass  # fall back to polling below
            while True:
                job = self.get(job_id)
                bar.job(job)
                if job["status"] in TERMINAL_STATUSES:
                    return job
                _check_deadline(deadline, job_id)
                time.sleep(poll_interval)
        finally:
            bar.close()

    def risk_report(self, job_id: str) -> Json:
        """The pre-screening risk report (a risk score per training example).

        Raises:
            NotFound: no such job, or pre-screening has not finished (``risk_report_not_ready``).
        """
        return self._client.request("GET", f"/jobs/{job_id}/risk-report")

    def audit(self, job_id: str) -> Json:
        """The safety audit: attack success rate, over-refusal and the release decision.

        Raises:
            NotFound: no such job, or the audit has not finished (``audit_report_not_ready``).
        """
        return self._client.request("GET", f"/jobs/{job_id}/audit")

    def adapter(self, job_id: str) -> Json:
        """Expiring download links of a released adapter (``url``, ``expires_at``, ``files``).

        Raises:
            NotFound: no such job, or no released adapter (``adapter_not_released``).
        """
        return self._client.request("GET", f"/jobs/{job_id}/adapter")

    def download_adapter(
        self, job_id: str, dest_dir: str | os.PathLike[str]
    ) -> builtins.list[Path]:
        """Download every file of a released adapter into ``dest_dir`` (created if needed).

        Returns:
            The paths written.

        Raises:
            NotFound: no such job, or no released adapter.
        """
        links = self.adapter(job_id)
        root = Path(dest_dir).resolve()
        written: list[Path] = []
        for item in links["files"]:
            target = (root / item["name"]).resolve()
            if not target.is_relative_to(root):
                raise ValueError(f"refusing to write adapter file {item['name']!r} outside {root}")
            target.parent.mkdir(parents=True, exist_ok=True)
            self._client._download(item["url"], target)
            written.append(target)
        return written


def _check_deadline(deadline: float | None, job_id: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise TimeoutError(f"job {job_id} had not finished before the timeout")


def parse_sse(lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(event type, data)`` per server-sent event; ``("comment", text)`` per comment line.

    Follows the WHATWG rules Tether's stream needs: ``data`` lines of one event are joined
    with newlines, a blank line ends an event, the default type is ``message``.
    """
    kind = "message"
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if not line:
            if data:
                yield kind, "\n".join(data)
            kind, data = "message", []
            continue
        if line.startswith(":"):
            yield "comment", line[1:].strip()
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            kind = value
        elif name == "data":
            data.append(value)
    if data:
        yield kind, "\n".join(data)


class _ProgressBar:
    """A tqdm bar of training steps, labelled with the job's status (a no-op without tqdm)."""

    def __init__(self, job_id: str, *, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # the SDK does not require tqdm
                return
            self._bar = tqdm(desc=job_id, unit="step", total=None, leave=True)

    def event(self, event: Json) -> None:
        data = event.get("data") or {}
        if event.get("type") == "status" and "status" in data:
            self._status(data["status"])
        if "step" in data:
            self._step(data)

    def job(self, job: Json) -> None:
        self._status(job["status"])
        if "step" in (job.get("progress") or {}):
            self._step(job["progress"])

    def _status(self, status: str) -> None:
        if self._bar is not None:
            self._bar.set_description(status)

    def _step(self, data: Json) -> None:
        if self._bar is None:
            return
        total = data.get("total_steps")
        if isinstance(total, int) and total != self._bar.total:
            self._bar.total = total
        step = data.get("step")
        if isinstance(step, int):
            self._bar.n = step
        postfix = {k: data[k] for k in ("loss", "kl", "beta") if isinstance(data.get(k), float)}
        self._bar.set_postfix(postfix, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
