"""relay fetch: download one URL to a file, resumably and verified; FILE is never half-written.

The transfer is `relay.transfer`'s, the engine download jobs use too: the body is saved as the
server sent it (`Accept-Encoding: identity` is asked for, so normally there is nothing to
decode) into FILE.part next to FILE, hashed with sha256 while it is written. Only when the size
(Content-Length or the Content-Range total), the optional --sha256 and a sha256 the server
announced (Repr-Digest, Digest, x-amz-checksum-sha256) match is FILE.part fsynced and renamed
to FILE (over it only with --force), and the directory fsynced. FILE.part.json remembers the
URL, the validator and the total, so a later run resumes the partial with Range + If-Range;
within one run a dropped connection or a read timeout is retried the same way (resuming only
with a strong validator and `Accept-Ranges: bytes`, otherwise starting over). What is relay
fetch's own is here: options, the record file (output.py), requests (client.py), messages and
the progress bar (progress.py), exit codes (errors.py).

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

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, TextIO
from urllib.parse import unquote, urlsplit

import httpx

from relay import __version__
from relay.fetch.client import MAX_REDIRECTS, BlockingOpener
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
from relay.fetch.output import FileOutput, ResumeRecord, StdoutSink
from relay.fetch.progress import Progress, format_size
from relay.http.continuation import FETCH_BACKOFF, Backoff
from relay.transfer import Events, Policy, Representation, Sink, Transfer, verify
from relay.transfer.errors import (
    AttemptFailed,
    DiskError,
    FileInUse,
    StatusLine,
    TargetExists,
    TransferError,
    UnexpectedStatus,
    VerificationFailed,
)

DEFAULT_RETRIES = 5
DEFAULT_RETRY_DELAY = FETCH_BACKOFF.first
MAX_RETRY_DELAY = FETCH_BACKOFF.cap
DEFAULT_TIMEOUT = 30.0


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
    mirrors: tuple[str, ...] = ()
    """Other URLs of the same file, asked in order after `url` (see relay.fetch.client)."""
    failover: str = "not-found"

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


class _Run(Events):
    """One `relay fetch`: the output, the transfer, and what the user is told on the way."""

    def __init__(
        self,
        options: FetchOptions,
        reporter: Reporter,
        *,
        transport: httpx.BaseTransport | None,
        stdout: IO[bytes] | None,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.options = options
        self.reporter = reporter
        self._transport = transport
        self._stdout = stdout
        self._sleep = sleep
        self.output: FileOutput | None = None
        self.stdout: StdoutSink | None = None
        self.size = 0  # bytes the output holds
        self.received = 0  # body bytes received in this run
        self.digest = ""
        self.kept = ""  # "; N kept in FILE.part, ..." when a failed run leaves the partial

    def prepare(self) -> None:
        """Check the output before anything is requested."""
        options = self.options
        if options.output == "-":
            out = self._stdout if self._stdout is not None else sys.stdout.buffer
            self.stdout = StdoutSink(out)
            return
        final = Path(options.output)
        if final.is_dir():
            raise LocalError(f"{final} is a directory")
        if os.path.lexists(final) and not options.force:
            raise OutputExists(f"{final} exists (give --force to replace it)")
        self.output = FileOutput(final)

    async def main(self) -> None:
        options = self.options
        known: Representation | None = None
        transfer: Transfer | None = None
        try:
            if self.output is not None:
                known = await self.output.open(
                    options.url, resume=options.resume, note=self.reporter.note
                )
            sink = self.sink
            with httpx.Client(
                transport=self._transport,
                headers={"User-Agent": f"relay-fetch/{__version__}"},
                timeout=httpx.Timeout(options.timeout),
                follow_redirects=True,
                max_redirects=MAX_REDIRECTS,
            ) as client:
                transfer = Transfer(
                    BlockingOpener(
                        client,
                        options.url,
                        options.headers,
                        mirrors=options.mirrors,
                        failover=options.failover,
                        sha256=options.sha256,
                    ),
                    sink,
                    policy=Policy(
                        retries=options.retries,
                        backoff=options.backoff_policy(),
                        # A 206 at the wrong offset ends the run (exit 5), FILE.part kept.
                        restart_bad_range=False,
                    ),
                    known=known,
                    events=self,
                    sleep=self._sleep,
                )
                await transfer.run()
            announced = transfer.representation.sha256
            if self.output is not None:
                self.digest = await self.output.publish(
                    replace=options.force, expected_sha256=options.sha256, upstream_sha256=announced
                )
            elif self.stdout is not None:
                verify(
                    sink.size,
                    sink.hexdigest(),
                    expected_sha256=options.sha256,
                    upstream_sha256=announced,
                )
                self.stdout.flush()
                self.digest = sink.hexdigest()
            self.size = sink.size
        except TransferError as exc:
            error = self._fetch_error(exc)
            await self._leave(transfer.representation if transfer else known, error)
            raise type(error)(f"{error}{self.kept}") from exc
        except (FetchError, OSError, KeyboardInterrupt, asyncio.CancelledError) as exc:
            await self._leave(transfer.representation if transfer else known, exc)
            if isinstance(exc, FetchError):
                raise type(exc)(f"{exc}{self.kept}") from exc
            if isinstance(exc, OSError):
                raise LocalError(f"{exc}{self.kept}") from exc
            raise
        finally:
            if self.output is not None:  # still open only after an unforeseen error: kept
                await self.output.close(keep=True, flush=False)

    @property
    def sink(self) -> Sink:
        sink = self.output.partial if self.output is not None else self.stdout
        assert sink is not None, "prepare() first"
        return sink

    async def _leave(self, known: Representation | None, error: BaseException) -> None:
        """Close the output after a failure: the partial is kept when it can be resumed."""
        output = self.output
        if output is None:
            return
        resumable = known is not None and known.validator is not None
        keep = output.size > 0 and resumable and not isinstance(error, VerifyFailed)
        interrupted = isinstance(error, KeyboardInterrupt | asyncio.CancelledError)
        kept = await output.close(keep=keep, flush=not interrupted)
        if kept:
            self.kept = (
                f"; {format_size(kept)} kept in {output.path}, run the same command again to resume"
            )

    def _fetch_error(self, exc: TransferError) -> FetchError:
        """The one translation of a transfer's failure into relay fetch's errors."""
        if isinstance(exc, AttemptFailed):
            done = exc.failures - 1
            plural = "y" if done == 1 else "ies"
            suffix = f" (gave up after {done} retr{plural})" if done else ""
            if exc.answer is not None:
                return HTTPStatusError(f"{_said(exc.answer)}{suffix}")
            return TransferFailed(f"{exc.reason}{suffix}")
        if isinstance(exc, UnexpectedStatus):
            said = _said(exc.answer)
            if exc.answer.status < 400:
                said = f"unexpected status {said}"
            return HTTPStatusError(said)
        if isinstance(exc, VerificationFailed):
            return VerifyFailed(exc.reason)
        if isinstance(exc, DiskError | FileInUse):
            return LocalError(exc.reason)
        if isinstance(exc, TargetExists):
            return OutputExists(f"{exc.reason} (give --force to replace it)")
        return TransferFailed(exc.reason)

    # ---- the transfer's events --------------------------------------------------------------

    async def head(self, representation: Representation, response: httpx.Response) -> None:
        encoding = response.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            self.reporter.note(f"saving the body as sent (Content-Encoding: {encoding})", once=True)
        if self.output is not None:
            record = ResumeRecord(self.options.url, representation.validator, representation.total)
            await self.output.save(record)
        self.reporter.start(representation.total, self.sink.size)

    def progress(self, size: int, received: int) -> None:
        self.received += received
        self.reporter.update(size)

    async def restarting(self, reason: str) -> None:
        self.reporter.note(f"{reason}; starting over")
        if self.output is not None:
            await self.output.forget()

    def retrying(self, error: AttemptFailed, delay: float, failures: int) -> None:
        size = self.sink.size
        what = _said(error.answer) if error.answer is not None else error.reason
        where = f", resuming at {format_size(size)}" if size else ""
        self.reporter.note(
            f"{what}; retrying in {delay:.1f} s ({failures}/{self.options.retries}){where}"
        )


def _said(answer: StatusLine) -> str:
    return f"{answer.status} {answer.phrase} from {answer.url}"


def fetch(
    options: FetchOptions,
    reporter: Reporter,
    *,
    transport: httpx.BaseTransport | None = None,
    stdout: IO[bytes] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> str:
    """Download `options.url` to `options.output`; returns the sha256. Raises FetchError."""
    started = clock()
    run = _Run(options, reporter, transport=transport, stdout=stdout, sleep=sleep)
    run.prepare()
    try:
        with _ctrl_c_interrupts():
            asyncio.run(run.main())
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted{run.kept}") from None
    finally:
        if reporter.bar is not None:
            reporter.bar.clear()
    if not reporter.quiet:
        elapsed = max(clock() - started, 1e-6)
        where = "stdout" if run.output is None else str(run.output.final)
        resumed = run.size - run.received
        extra = f", resumed at {format_size(resumed)}" if resumed > 0 else ""
        print(
            f"relay fetch: saved {where}: {format_size(run.size)} in {elapsed:.2f} s "
            f"({format_size(run.received / elapsed)}/s{extra}), sha256 {run.digest}",
            file=reporter.stream,
            flush=True,
        )
    return run.digest


@contextlib.contextmanager
def _ctrl_c_interrupts() -> Iterator[None]:
    """Ctrl-C raises KeyboardInterrupt where the program is, as in any Python program.

    asyncio.run would instead cancel the task, which notices only when it next waits: a read
    blocked on a stalled server would keep the user waiting for the read timeout. The partial
    file is then closed without flushing (`FileOutput.close`), so an interrupt landing in the
    middle of its bookkeeping cannot leave a gap in what is kept.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    signal.signal(signal.SIGINT, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


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
            mirrors=tuple(args.get("mirrors") or ()),
            failover=args.get("failover") or "not-found",
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
