"""relay fetch's exit codes and the errors that carry them."""

from __future__ import annotations

import enum
import textwrap
from collections.abc import Mapping


class ExitCode(enum.IntEnum):
    OK = 0
    LOCAL_ERROR = 1
    USAGE = 2
    HTTP_ERROR = 3
    OUTPUT_EXISTS = 4
    TRANSFER_FAILED = 5
    VERIFY_FAILED = 6
    INTERRUPTED = 130


EXIT_CODES: Mapping[ExitCode, str] = {
    ExitCode.OK: "ok: FILE complete; size and, with --sha256, checksum verified",
    ExitCode.LOCAL_ERROR: "local error: cannot write FILE, FILE.part or the directory; "
    "FILE.part in use",
    ExitCode.USAGE: "usage: invalid arguments, a URL that is not http(s), no file name in the URL",
    ExitCode.HTTP_ERROR: "HTTP error: an error or unexpected status "
    "(408/429/5xx after the retries)",
    ExitCode.OUTPUT_EXISTS: "FILE exists (give --force to replace it)",
    ExitCode.TRANSFER_FAILED: "transfer failed after the retries (refused, reset, dropped, read "
    "timeout, short body) or an unusable 206/416; FILE.part kept for the next run",
    ExitCode.VERIFY_FAILED: "size or checksum mismatch; FILE.part removed",
    ExitCode.INTERRUPTED: "interrupted (Ctrl-C); FILE.part kept for the next run",
}


def exit_code_table(width: int = 79) -> str:
    """The exit codes as an aligned two-column table (for --help)."""
    return "\n".join(
        textwrap.fill(text, width, initial_indent=f"  {int(code):<4} ", subsequent_indent=" " * 7)
        for code, text in EXIT_CODES.items()
    )


# ---- errors -----------------------------------------------------------------------------------


class FetchError(Exception):
    exit_code = ExitCode.LOCAL_ERROR


class LocalError(FetchError):
    exit_code = ExitCode.LOCAL_ERROR


class UsageError(FetchError):
    exit_code = ExitCode.USAGE


class HTTPStatusError(FetchError):
    exit_code = ExitCode.HTTP_ERROR


class OutputExists(FetchError):
    exit_code = ExitCode.OUTPUT_EXISTS


class TransferFailed(FetchError):
    exit_code = ExitCode.TRANSFER_FAILED


class VerifyFailed(FetchError):
    exit_code = ExitCode.VERIFY_FAILED


class Interrupted(FetchError):
    exit_code = ExitCode.INTERRUPTED
