"""relay fetch: download one URL to a file, resumably and verified; FILE is never half-written.

The body is saved as the server sent it (`iter_raw`; `Accept-Encoding: identity` is asked
for, so normally there is nothing to decode), into FILE.part next to FILE, hashed with sha256
while it is written. Only when the size (Content-Length or the Content-Range total) and the
optional --sha256 match is FILE.part fsynced and renamed over FILE, and the directory fsynced.
FILE.part.json remembers the URL, the validator and the total, so a later run resumes the
partial with Range + If-Range; within one run a dropped connection or a read timeout is
retried the same way (resuming only with a strong validator and `Accept-Ranges: bytes`,
otherwise starting over).

Exit codes
    0    ok: FILE complete; size and, with --sha256, checksum verified
    1    local error: cannot write FILE, FILE.part or the directory; FILE.part in use
    2    usage: invalid arguments, a URL that is not http(s), no file name in the URL
    3    HTTP error: an error or unexpected status (408/429/5xx after the retries)
    4    FILE exists (give --force to replace it)
    5    transfer failed after the retries (refused, reset, dropped, read timeout,
         short body) or an unusable 206/416; FILE.part kept for the next run
    6    size or checksum mismatch; FILE.part removed
    130  interrupted (Ctrl-C); FILE.part kept for the next run

Errors (each carries its exit code)
    FetchError
    ├── LocalError       1
    ├── UsageError       2
    ├── HTTPStatusError  3
    ├── OutputExists     4
    ├── TransferFailed   5
    ├── VerifyFailed     6
    └── Interrupted      130
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TextIO
from urllib.parse import unquote, urlsplit

import httpx

from relay import __version__
from relay.fetch.errors import (
    ExitCode,
    FetchError,
    HTTPStatusError,
    Interrupted,
    LocalError,
    OutputExists,
    TransferFailed,
    UsageError,
    VerifyFailed,
)
from relay.fetch.partial import Meta, PartialFile, Sink, StdoutSink
from relay.fetch.progress import Progress, format_size
from relay.http import continuation, ranges
from relay.http.continuation import (
    FETCH_BACKOFF,
    RETRY_STATUSES,
    Backoff,
    Continuation,
    Next,
    Retries,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no advisory lock on the partial
    fcntl = None  # type: ignore[assignment]


DEFAULT_RETRIES = 5
DEFAULT_RETRY_DELAY = FETCH_BACKOFF.first
MAX_RETRY_DELAY = FETCH_BACKOFF.cap
DEFAULT_TIMEOUT = 30.0
MAX_REDIRECTS = 10


class _Retry(Exception):
    """A transient failure: retry (within --retries), else raise `error`."""

    def __init__(self, error: FetchError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


# Dropped, reset, refused, timed out, short or malformed body: worth another try.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


# ---- options and argument parsing ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class FetchOptions:
    url: str
    output: str  # a path, or "-" for stdout
    sha256: str | None = None
    retries: int = DEFAULT_RETRIES
    retry_delay: float = DEFAULT_RETRY_DELAY
    timeout: float = DEFAULT_TIMEOUT
    headers: tuple[tuple[str, str], ...] = ()
    resume: bool = True
    force: bool = False

    def backoff(self, retry: int) -> float:
        """Seconds before retry number `retry` (0-based): retry_delay x 2^retry, capped."""
        return self.backoff_policy().delay(retry + 1)

    def backoff_policy(self) -> Backoff:
        return Backoff(first=self.retry_delay, cap=MAX_RETRY_DELAY)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL = re.compile(r"[\x00-\x1f\x7f]")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
# The downloader owns these: a user value would break resuming and the size check.
_RESERVED_HEADERS = frozenset({"range", "if-range"})


def url_arg(value: str) -> str:
    """argparse type: an absolute http(s) URL with a host."""
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        raise ValueError(f"invalid URL {value!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"not an http(s) URL: {value!r}")
    return value


def header_arg(value: str) -> tuple[str, str]:
    """argparse type: "Name: value" -> ("Name", "value")."""
    name, colon, text = value.partition(":")
    name, text = name.strip(), text.strip()
    if not colon or not _TOKEN.fullmatch(name) or _CTL.search(text):
        raise ValueError(f'expected "Name: value", got {value!r}')
    if name.lower() in _RESERVED_HEADERS:
        raise ValueError(f"{name} is set by relay fetch itself (for resuming)")
    return name, text


def sha256_arg(value: str) -> str:
    """argparse type: 64 hex digits, returned lower-case."""
    if not _HEX64.fullmatch(value.strip()):
        raise ValueError("expected 64 hex digits")
    return value.strip().lower()


def output_name(url: str) -> str:
    """The file name for a URL given no -o: its last path segment, percent-decoded.

    Separators and control characters in the decoded name become "_"; "", "." and ".." are
    refused (the query string is ignored; Content-Disposition is never trusted).
    """
    segment = urlsplit(url).path.rsplit("/", 1)[-1]
    name = re.sub(r"[/\\\x00-\x1f\x7f]", "_", unquote(segment, errors="replace"))
    if name in ("", ".", ".."):
        raise UsageError(f"cannot derive a file name from {url!r}; give -o FILE")
    return name


# ---- HTTP details -------------------------------------------------------------------------------


def parse_content_range(value: str | None) -> tuple[int | None, int | None, int | None] | None:
    """ "bytes 10-19/100" -> (10, 19, 100); "bytes */100" -> (None, None, 100); bad -> None."""
    parsed = ranges.parse_content_range(value)
    if parsed is not None:
        return parsed.start, parsed.end, parsed.total
    total = ranges.parse_unsatisfied_range(value)
    return None if total is None else (None, None, total)


def content_length(response: httpx.Response) -> int | None:
    return continuation.content_length(response.headers)


def resume_validator(headers: httpx.Headers) -> str | None:
    """The If-Range value to resume with (see relay.http.continuation), or None when not safe."""
    return continuation.validator_for(headers)


def _describe(exc: httpx.HTTPError, received: int = 0) -> str:
    kinds: dict[type[httpx.HTTPError], str] = {
        httpx.ConnectTimeout: "timed out connecting",
        httpx.ReadTimeout: "timed out reading",
        httpx.ConnectError: "cannot connect",
        httpx.RemoteProtocolError: "connection lost",
        httpx.ReadError: "connection lost",
    }
    kind = kinds.get(type(exc), type(exc).__name__)
    if received:
        kind += f" after {format_size(received)}"
    detail = str(exc)
    return f"{kind}: {detail}" if detail and detail != "timed out" else kind


# ---- reporting ----------------------------------------------------------------------------------


@dataclass
class Reporter:
    """Notes, the progress bar and the summary on stderr; `quiet` leaves only errors."""

    stream: TextIO
    bar: Progress | None = None
    quiet: bool = False
    noted: set[str] = field(default_factory=set, init=False)

    def note(self, message: str, *, once: bool = False) -> None:
        if self.quiet or (once and message in self.noted):
            return
        self.noted.add(message)
        self._print(f"relay fetch: {message}")

    def error(self, message: str) -> None:
        self._print(f"relay fetch: error: {message}")

    def start(self, total: int | None, done: int) -> None:
        if self.bar is not None:
            self.bar.start(total, done)

    def update(self, done: int) -> None:
        if self.bar is not None:
            self.bar.update(done)

    def _print(self, line: str) -> None:
        if self.bar is not None:
            self.bar.clear()
        print(line, file=self.stream, flush=True)


# ---- the download -------------------------------------------------------------------------------


class Fetcher:
    """Requests, retries and resumes until `sink` holds the whole representation."""

    def __init__(
        self,
        options: FetchOptions,
        sink: Sink,
        client: httpx.Client,
        reporter: Reporter,
        *,
        meta: Meta | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.options = options
        self.sink = sink
        self.client = client
        self.reporter = reporter
        self.meta = meta
        self.received = 0  # body bytes received in this run
        self._sleep = sleep

    def run(self) -> None:
        retries = Retries(self.options.retries, self.options.backoff_policy())
        while True:
            try:
                if self._attempt():
                    break
                continue  # start over at once (the partial was of no use)
            except _Retry as retry:
                if not retries.fail():
                    done = retries.failures - 1
                    plural = "y" if done == 1 else "ies"
                    suffix = f" (gave up after {done} retr{plural})" if done else ""
                    raise type(retry.error)(f"{retry.error}{suffix}") from retry.__cause__
                delay = retries.delay(retry.retry_after)
                resumable = self.meta is not None and self.meta.validator is not None
                if self.sink.size and not resumable:
                    try:
                        self.sink.restart()
                    except TransferFailed as exc:
                        raise TransferFailed(f"{retry.error}; {exc}") from retry.__cause__
                where = f", resuming at {format_size(self.sink.size)}" if self.sink.size else ""
                self.reporter.note(
                    f"{retry.error}; retrying in {delay:.1f} s "
                    f"({retries.failures}/{self.options.retries}){where}"
                )
                self._sleep(delay)
        self._verify()

    def _attempt(self) -> bool:
        offset, meta = self.sink.size, self.meta
        headers = {"Accept-Encoding": "identity", **dict(self.options.headers)}
        plan: Continuation | None = None
        if offset > 0 and meta is not None and meta.validator is not None:
            plan = Continuation(validator=meta.validator, total=meta.total)
            headers.update(plan.request_headers(offset))
        try:
            with self.client.stream("GET", self.options.url, headers=headers) as response:
                return self._handle(response, offset, plan)
        except _TRANSIENT as exc:
            raise _Retry(TransferFailed(_describe(exc, self.sink.size))) from exc
        except httpx.TooManyRedirects as exc:
            raise HTTPStatusError(f"more than {MAX_REDIRECTS} redirects") from exc
        except httpx.HTTPError as exc:
            raise TransferFailed(_describe(exc)) from exc

    def _handle(self, response: httpx.Response, offset: int, plan: Continuation | None) -> bool:
        status = response.status_code
        if plan is not None:
            assert self.meta is not None
            verdict = plan.judge(status, response.headers, offset)
            if verdict.next is Next.APPEND:
                if self.meta.total is None:
                    self.meta = Meta(self.meta.url, self.meta.validator, verdict.total)
                    self.sink.save_meta(self.meta)
                self._body(response)
                return True
            if verdict.next is Next.COMPLETE:
                self.meta = Meta(self.meta.url, self.meta.validator, verdict.total)
                return True  # the partial already holds every byte
            if verdict.next is Next.BAD_RANGE:
                known = self.meta.total
                raise TransferFailed(
                    f"unusable 206 from {response.url}: asked for bytes {offset}- of "
                    f"{'?' if known is None else known} bytes, got Content-Range "
                    f"{response.headers.get('content-range')!r} ({verdict.reason})"
                )
            if verdict.next in (Next.CHANGED, Next.REFUSED):
                what = (
                    "file changed" if verdict.next is Next.CHANGED else "server refused the range"
                )
                self.reporter.note(f"the {what} ({verdict.reason}); starting over")
                self.sink.restart()
                self.meta = None
                return False
            if verdict.next is Next.RESTART:
                self.reporter.note(
                    "the server sent the whole file (it changed, or ignored the range); "
                    "starting over"
                )
                self.sink.restart()
        if status == 200:
            validator = resume_validator(response.headers)
            self.meta = Meta(self.options.url, validator, content_length(response))
            self.sink.save_meta(self.meta)
            self._body(response)
            return True
        message = f"{status} {response.reason_phrase} from {response.url}"
        if status in RETRY_STATUSES:
            raise _Retry(HTTPStatusError(message), continuation.retry_after(response.headers))
        if status == 206:
            raise TransferFailed(f"unexpected {message} to a request without Range")
        raise HTTPStatusError(message if status >= 400 else f"unexpected status {message}")

    def _body(self, response: httpx.Response) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self.reporter.note(f"saving the body as sent (Content-Encoding: {encoding})", once=True)
        assert self.meta is not None
        self.reporter.start(self.meta.total, self.sink.size)
        for chunk in response.iter_raw():
            self.sink.write(chunk)
            self.received += len(chunk)
            self.reporter.update(self.sink.size)

    def _verify(self) -> None:
        total = self.meta.total if self.meta is not None else None
        if total is not None and self.sink.size != total:
            raise VerifyFailed(f"size mismatch: got {self.sink.size} bytes, expected {total}")
        expected, digest = self.options.sha256, self.sink.digest()
        if expected is not None and digest != expected:
            raise VerifyFailed(f"sha256 mismatch: got {digest}, expected {expected}")


def fetch(
    options: FetchOptions,
    reporter: Reporter,
    *,
    transport: httpx.BaseTransport | None = None,
    stdout: IO[bytes] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Download `options.url` to `options.output`; returns the sha256. Raises FetchError."""
    started = clock()
    partial: PartialFile | None = None
    out: IO[bytes] | None = None
    sink: Sink
    if options.output == "-":
        out = stdout if stdout is not None else sys.stdout.buffer
        sink = StdoutSink(out)
    else:
        final = Path(options.output)
        if final.is_dir():
            raise LocalError(f"{final} is a directory")
        if os.path.lexists(final) and not options.force:
            raise OutputExists(f"{final} exists (give --force to replace it)")
        sink = partial = PartialFile(final)
    meta: Meta | None = None
    fetcher: Fetcher | None = None
    try:
        if partial is not None:
            meta = partial.open(options.url, resume=options.resume, note=reporter.note)
        with httpx.Client(
            transport=transport,
            headers={"User-Agent": f"relay-fetch/{__version__}"},
            timeout=httpx.Timeout(options.timeout),
            follow_redirects=True,
            max_redirects=MAX_REDIRECTS,
        ) as client:
            fetcher = Fetcher(options, sink, client, reporter, meta=meta, sleep=sleep)
            fetcher.run()
        if partial is not None:
            partial.publish()
        elif out is not None:
            out.flush()
    except VerifyFailed:
        if partial is not None:
            partial.close(keep=False)
        raise
    except (FetchError, OSError, KeyboardInterrupt) as exc:
        kept = ""
        if partial is not None:
            if fetcher is not None:
                meta = fetcher.meta
            keep = partial.size > 0 and meta is not None and meta.validator is not None
            partial.close(keep=keep)
            if keep:
                kept = (
                    f"; {format_size(partial.size)} kept in {partial.path}, "
                    "run the same command again to resume"
                )
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted(f"interrupted{kept}") from None
        if isinstance(exc, OSError):
            raise LocalError(f"{exc}{kept}") from exc
        raise type(exc)(f"{exc}{kept}") from exc
    finally:
        if reporter.bar is not None:
            reporter.bar.clear()
    if not reporter.quiet:
        elapsed = max(clock() - started, 1e-6)
        where = "stdout" if partial is None else str(partial.final)
        resumed = sink.size - fetcher.received
        extra = f", resumed at {format_size(resumed)}" if resumed > 0 else ""
        print(
            f"relay fetch: saved {where}: {format_size(sink.size)} in {elapsed:.2f} s "
            f"({format_size(fetcher.received / elapsed)}/s{extra}), sha256 {sink.digest()}",
            file=reporter.stream,
            flush=True,
        )
    return sink.digest()


def run_fetch(args: Mapping[str, Any]) -> int:
    """`relay fetch`: the parsed options (see relay.cli) -> an exit code."""
    stream = sys.stderr
    quiet = bool(args.get("quiet"))
    show_bar = not quiet and (bool(args.get("progress")) or stream.isatty())
    bar = Progress(stream, width=_terminal_width(stream)) if show_bar else None
    reporter = Reporter(stream, bar=bar, quiet=quiet)
    try:
        url: str = args["url"]
        headers: Sequence[tuple[str, str]] = args.get("headers") or ()
        options = FetchOptions(
            url=url,
            output=args.get("output") or output_name(url),
            sha256=args.get("sha256"),
            retries=args.get("retries", DEFAULT_RETRIES),
            retry_delay=args.get("retry_delay", DEFAULT_RETRY_DELAY),
            timeout=args.get("timeout", DEFAULT_TIMEOUT),
            headers=tuple(headers),
            resume=not args.get("no_resume"),
            force=bool(args.get("force")),
        )
        fetch(options, reporter)
    except FetchError as exc:
        reporter.error(str(exc))
        return int(exc.exit_code)
    except KeyboardInterrupt:  # before or after the transfer: nothing to keep
        return int(ExitCode.INTERRUPTED)
    return int(ExitCode.OK)


def _terminal_width(stream: TextIO) -> int:
    try:
        columns = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        columns = 0
    return columns if columns > 0 else shutil.get_terminal_size().columns
