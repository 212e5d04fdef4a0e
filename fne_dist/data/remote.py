"""Opening shards by url, with a timeout on every wait and bounded retries, so that a stalled server cannot hang a run.

Urls: local paths (or `file://`), `pipe:CMD` (the command's stdout, as in webdataset and open_clip, e.g.
`pipe:curl -fsSL https://host/train-000000.tar`), `http://` and `https://` (urllib), and `s3://bucket/key` (boto3,
which takes credentials, region and endpoint from its usual sources: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or
~/.aws, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL for an S3-compatible store).  webdataset's own openers are not used
for remote urls: its https opener runs curl with connection timeouts only, so a server that accepts and then stalls
blocks the reader forever (seen: a run stuck at one step until killed).

A remote shard is read through `ShardStream`.  Every wait for bytes (connecting, each receive, a command's exit)
gives up after `timeout` seconds, and every read of n bytes after `timeout + n / min_rate` seconds: a server that
trickles bytes, each receive well within the timeout, would otherwise hold a 64 KiB read for hours (checked as
bytes arrive, so a read ends at the latest one `timeout` after its deadline).  A failure (timeout, too slow a read,
reset connection, a body shorter than announced, a command's non-zero exit) keeps the bytes read so far and reopens
the url at the byte where the stream stopped (HTTP / S3 range request; for a command or a server without ranges the
bytes are read again and dropped), at most `retries` times per shard, waiting 1, 2, 4 ... seconds (never more than
`timeout`) in between.  The tar reader above sees one unbroken stream, so a shard that
recovers yields exactly the samples it holds.  Permanent answers (HTTP 4xx but 408 / 429, S3 NoSuchKey or
AccessDenied) are not retried.  A shard that still fails raises `ShardError` once, naming the url, and then reads as
ended: the loader logs it, counts it and goes on with the next shard.
"""
from __future__ import annotations

import functools
import io
import logging
import os
import select
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator

log = logging.getLogger(__name__)

SCHEMES = ("pipe:", "http://", "https://", "s3://", "file://")


@dataclass(frozen=True)
class Fetch:
    """How long to wait for shard bytes, and how often to reopen a failing shard."""

    timeout: float = 60.0  # seconds, per wait (connect, each receive)
    retries: int = 3  # reopenings per shard after the first attempt
    min_rate: float = 65536.0  # bytes / s: a read of n bytes is given up after timeout + n / min_rate seconds


class ShardError(OSError):
    """A shard that could not be read, after the retries or at once for a permanent answer."""


class _Permanent(Exception):
    """An answer that another attempt will not change (no such object, access denied)."""


def is_remote(url: str) -> bool:
    return url.startswith(SCHEMES[:4])


def unsupported_scheme(url: str) -> str | None:
    """Why a url with a scheme cannot be opened here, or None when it can."""
    if url.startswith(SCHEMES):
        return None
    scheme = url.split(":", 1)[0]
    return (f"{url!r}: the scheme '{scheme}:' has no opener here (known: {', '.join(SCHEMES)}); read it through "
            f"a command instead, e.g. 'pipe:gsutil cat gs://bucket/x.tar' or 'pipe:aws s3 cp s3://bucket/x.tar -'")


# ---- one attempt per scheme: (body, byte the body starts at, total length or None); a body has .close() and
# .read1(n), which returns up to n bytes after at most one wait (b"" at the end), so that ShardStream can watch the
# clock while a read fills ----

def _http_status_is_permanent(status: int) -> bool:
    return 400 <= status < 500 and status not in (408, 429)


def _open_http(url: str, offset: int, timeout: float):
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if _http_status_is_permanent(err.code):
            raise _Permanent(f"HTTP {err.code} {err.reason}") from err
        raise
    start = offset if response.status == 206 else 0
    size = response.headers.get("Content-Length")
    return response, start, None if size is None else start + int(size)


@functools.lru_cache(maxsize=None)
def _s3_client(timeout: float, pid: int):
    """One client per process (boto3 clients must not cross a fork) and timeout; retries are ours, not botocore's."""
    import boto3
    from botocore.config import Config

    return boto3.client("s3", config=Config(connect_timeout=timeout, read_timeout=timeout,
                                            retries={"total_max_attempts": 1}))


def _open_s3(url: str, offset: int, timeout: float):
    try:
        from botocore.exceptions import ClientError
    except ImportError:
        raise _Permanent("s3:// shards need boto3: pip install 'fne-dist[s3]' (or boto3)") from None
    bucket, _, key = url[len("s3://"):].partition("/")
    ranged = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        answer = _s3_client(timeout, os.getpid()).get_object(Bucket=bucket, Key=key, **ranged)
    except ClientError as err:
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if _http_status_is_permanent(status):
            raise _Permanent(f"S3 {err.response.get('Error', {}).get('Code')} (HTTP {status})") from err
        raise
    # botocore's StreamingBody reads until it has all it was asked for; its urllib3 response reads once (read1)
    return answer["Body"]._raw_stream, offset, offset + answer["ContentLength"]


class _Command:
    """stdout of a shell command, read with a timeout on every wait; the command's failure is an error at the end."""

    def __init__(self, command: str, timeout: float):
        self.command, self.timeout = command, timeout
        self.proc = subprocess.Popen(command, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     start_new_session=True)

    def read1(self, n: int) -> bytes:
        fd = self.proc.stdout.fileno()
        if not select.select([fd], [], [], self.timeout)[0]:
            raise TimeoutError(f"no output for {self.timeout:g} s")
        data = os.read(fd, n)
        if not data:
            status = self.proc.wait(timeout=self.timeout)
            if status:
                raise OSError(f"the command exited with status {status}")
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the shell and what it started (curl, aws, ...)
        self.proc.wait()
        self.proc.stdout.close()


def _open_command(url: str, offset: int, timeout: float):
    return _Command(url[len("pipe:"):], timeout), 0, None


OPENERS: dict[str, Callable] = {"pipe:": _open_command, "http://": _open_http, "https://": _open_http,
                                "s3://": _open_s3}


class ShardStream(io.RawIOBase):
    """The bytes of one remote shard, reopened where they stopped after a failure (see the module docstring)."""

    def __init__(self, url: str, fetch: Fetch):
        super().__init__()
        self.url, self.name, self.fetch = url, url, fetch  # name: what io.BufferedReader shows in messages
        self._open = next(opener for prefix, opener in OPENERS.items() if url.startswith(prefix))
        self._body = None
        self._length: int | None = None
        self._dead = False
        self._error: ShardError | None = None  # why the shard was given up, until a read has raised it
        self.offset = 0
        self.failures = 0

    def __str__(self) -> str:
        return self.url

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        """Fills `buffer` (less at the shard's end), reopening the shard after the last byte read when it fails.  A
        shard given up hands over the bytes that came first; the next read raises the error, once."""
        view, start = memoryview(buffer).cast("B"), self.offset
        while not self._dead and self.offset - start < len(view):
            try:
                if self._body is None:
                    self._reopen()
                if not self._fill(view[self.offset - start:]):
                    break  # the shard's end
            except _Permanent as err:
                self._give_up(err)
            except Exception as err:  # timeouts, slow reads, resets, short bodies, a command's failure: try again
                self._failed(err)
        if self.offset == start and self._error is not None:
            error, self._error = self._error, None
            raise error
        return self.offset - start

    def _fill(self, view: memoryview) -> bool:
        """Reads into `view` until it is full (True) or the body ends (False); every byte read counts at once."""
        done = 0
        for data in self._pieces(len(view)):
            view[done:done + len(data)] = data
            done += len(data)
            self.offset += len(data)
        if done < len(view) and self._length is not None and self.offset < self._length:
            raise ConnectionError(f"connection closed at byte {self.offset} of {self._length}")
        return done == len(view)

    def _pieces(self, n: int) -> Iterator[bytes]:
        """The body's next n bytes (fewer at its end) as they come, within timeout + n / min_rate seconds."""
        begin = time.monotonic()
        allowed = self.fetch.timeout + n / self.fetch.min_rate
        left = n
        while left > 0:
            data = self._body.read1(min(left, 1 << 20))
            if not data:
                return
            left -= len(data)
            yield data
            if left and time.monotonic() - begin > allowed:
                raise TimeoutError(f"too slow: {n - left} of {n} bytes in {time.monotonic() - begin:.1f} s (a read "
                                   f"of n bytes may last timeout + n / min_rate = {allowed:.1f} s)")

    def _reopen(self) -> None:
        body, start, length = self._open(self.url, self.offset, self.fetch.timeout)
        self._body, self._length = body, length
        skip = self.offset - start  # no range support: drop the bytes already delivered
        skipped = sum(len(chunk) for chunk in self._pieces(skip))
        if skipped < skip:
            raise ConnectionError(f"connection closed at byte {start + skipped} while skipping to {self.offset}")

    def _failed(self, err: Exception) -> None:
        self._close_body()
        self.failures += 1
        if self.failures > self.fetch.retries:
            self._give_up(err)
            return
        delay = min(2.0 ** (self.failures - 1), self.fetch.timeout)
        log.warning("shard %s: %r at byte %d; retry %d of %d in %g s", self.url, err, self.offset, self.failures,
                    self.fetch.retries, delay)
        time.sleep(delay)

    def _give_up(self, err: Exception) -> None:
        self._close_body()
        self._dead = True
        tries = "" if isinstance(err, _Permanent) else f" after {self.failures} attempts"
        self._error = ShardError(f"shard {self.url}: {err}{tries}, at byte {self.offset}; the rest of the shard is "
                                 "skipped")
        self._error.__cause__ = err

    def _close_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception as err:  # a broken connection may fail to close; it is dropped either way
                log.debug("shard %s: closing: %r", self.url, err)

    def close(self) -> None:
        self._close_body()
        super().close()


def open_shard(url: str, fetch: Fetch):
    """A binary stream of the shard: a plain file for local paths, a `ShardStream` for remote urls."""
    if is_remote(url):
        return io.BufferedReader(ShardStream(url, fetch), buffer_size=1 << 16)
    return open(url.removeprefix("file://"), "rb")


def open_shards(urls, fetch: Fetch, handler: Callable[[Exception], bool]) -> Iterator[dict]:
    """{"url", "stream"} per shard, the input of webdataset's tar_file_expander; each stream is closed when the
    next one is asked for (webdataset's url_opener never closes them, which leaks connections and processes)."""
    for url in urls:
        try:
            stream = open_shard(url, fetch)
        except Exception as exn:  # a local file that vanished
            if handler(exn):
                continue
            raise
        with stream:
            yield {"url": url, "stream": stream}
