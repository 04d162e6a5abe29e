"""The command line: a thin layer mapping options onto Config and running the server."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from relay import __version__
from relay.config import ENV_PREFIX, Config, cli_flag, env_var, routes_setting, settings
from relay.errors import ConfigError, StartupError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the relay server",
        description="Run the relay. Settings come from (lowest to highest precedence) the "
        f"TOML file, {ENV_PREFIX}* environment variables, then these options.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    routes = routes_setting().metadata
    p.add_argument(
        routes["flag"],
        dest="routes",
        action="append",
        metavar=routes["metavar"],
        help=f"{routes['help']} (repeatable; env {env_var('routes')})",
    )
    for f in settings():
        help_text = f"{f.metadata['help']} (default: {f.default}; env {env_var(f.name)})"
        if "choices" in f.metadata:
            p.add_argument(
                cli_flag(f.name),
                dest=f.name,
                choices=f.metadata["choices"],
                type=_not_removed(f.metadata.get("removed", {})),
                help=help_text,
            )
        else:
            metavar = f.name.split("_")[-1].upper()
            p.add_argument(cli_flag(f.name), dest=f.name, metavar=metavar, help=help_text)


def _not_removed(removed: dict[str, str]) -> Callable[[str], str]:
    """An argparse type refusing a value relay no longer has with the reason (say, a removed
    transport), before argparse's own "invalid choice"."""

    def check(value: str) -> str:
        if value in removed:
            raise argparse.ArgumentTypeError(removed[value])
        return value

    return check


def _fetch_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from relay.fetch import fetcher  # argument types and defaults live with the downloader
    from relay.fetch.errors import exit_code_table

    def arg_type(convert: Callable[[str], object], name: str) -> Callable[[str], object]:
        def parse(value: str) -> object:
            try:
                return convert(value)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        parse.__name__ = name  # argparse names the type in its error message
        return parse

    def bounded(kind: Callable[[str], float], low: float, strict: bool) -> Callable[[str], float]:
        def parse(value: str) -> float:
            number = kind(value)
            if number < low or (strict and number == low):
                raise ValueError(f"must be {'>' if strict else '>='} {low:g}; got {value}")
            return number

        return parse

    p = sub.add_parser(
        "fetch",
        help="download a URL to a file (resumable, verified)",
        description="Download URL to FILE through FILE.part: resume an interrupted download\n"
        "(Range + If-Range), retry dropped connections, verify the size and optionally the\n"
        "sha256, and rename FILE.part to FILE only when complete. The body is saved as\n"
        "sent (Accept-Encoding: identity is asked for; nothing is decompressed).",
        epilog="exit codes:\n" + exit_code_table(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", metavar="URL", type=arg_type(fetcher.url_arg, "URL"), help="http(s) URL")
    p.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="where to save; - for stdout (no resume). Default: the last segment of the URL "
        "path, percent-decoded, in the current directory",
    )
    p.add_argument(
        "--sha256",
        metavar="HEX",
        type=arg_type(fetcher.sha256_arg, "sha256"),
        help="expected sha256 of the body; on mismatch FILE is not written (exit 6)",
    )
    p.add_argument(
        "--retries",
        metavar="N",
        type=arg_type(bounded(int, 0, strict=False), "retries"),
        default=fetcher.DEFAULT_RETRIES,
        help="retries after a dropped connection, timeout or 408/429/5xx "
        f"(default: {fetcher.DEFAULT_RETRIES})",
    )
    p.add_argument(
        "--retry-delay",
        metavar="S",
        type=arg_type(bounded(float, 0, strict=False), "retry-delay"),
        default=fetcher.DEFAULT_RETRY_DELAY,
        help=f"first retry delay in seconds, doubled each retry up to {fetcher.MAX_RETRY_DELAY:g} "
        f"(default: {fetcher.DEFAULT_RETRY_DELAY:g})",
    )
    p.add_argument(
        "--timeout",
        metavar="S",
        type=arg_type(bounded(float, 0, strict=True), "timeout"),
        default=fetcher.DEFAULT_TIMEOUT,
        help="seconds to connect, and to wait for each read; no total limit "
        f"(default: {fetcher.DEFAULT_TIMEOUT:g})",
    )
    p.add_argument(
        "-H",
        "--header",
        dest="headers",
        action="append",
        metavar='"NAME: VALUE"',
        type=arg_type(fetcher.header_arg, "header"),
        help="extra request header (repeatable); Range and If-Range are refused",
    )
    p.add_argument(
        "--no-resume", action="store_true", help="discard an existing FILE.part and start over"
    )
    p.add_argument(
        "--force", action="store_true", help="replace FILE if it exists (only once complete)"
    )
    shown = p.add_mutually_exclusive_group()
    shown.add_argument(
        "--progress", action="store_true", help="draw the progress bar even if stderr is no TTY"
    )
    shown.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, notes or summary; only errors"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Streaming file-download relay.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    _fetch_parser(sub)
    _sign_parser(sub)
    return parser


def _sign_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "sign",
        help="print a signed, expiring URL path for relay's signing_key",
        description="Sign METHOD and PATH with its query (e.g. /gh/org/repo/file.tar.gz?v=1) "
        f"with the signing key from {env_var('signing_key')} or --key-file, printing "
        "PATH?...&expires=..&signature=.. The URL is valid only for that method (GET also "
        "covers HEAD), that path and that exact query.",
    )
    p.add_argument(
        "path",
        metavar="PATH",
        help="the path on relay with its query, exactly as the client will send it",
    )
    p.add_argument(
        "-X",
        "--method",
        default="GET",
        type=str.upper,
        choices=("GET", "HEAD", "POST", "DELETE"),
        help="the method the URL is for (default: GET; a GET URL also serves HEAD)",
    )
    p.add_argument("--expires-in", type=int, default=3600, metavar="SECONDS")
    p.add_argument("--key-file", metavar="FILE", help="file holding the signing key")


def run_sign(args: dict[str, object]) -> int:
    from relay.server.auth import sign

    key_file = args.get("key_file")
    if isinstance(key_file, str):
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            print(f"relay: cannot read {key_file}: {exc.strerror}", file=sys.stderr)
            return 2
    else:
        key = os.environ.get(env_var("signing_key"), "")
    path = str(args["path"])
    if not key or not path.startswith("/"):
        print("relay: need a signing key and a PATH starting with '/'", file=sys.stderr)
        return 2
    base, _, query = path.partition("?")
    expires = int(time.time()) + int(str(args["expires_in"]))
    signed = sign(key, base, expires, method=str(args["method"]), query=query)
    print(f"{base}?{query + '&' if query else ''}{signed}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    if command == "sign":
        return run_sign(args)
    if command == "fetch":
        from relay.fetch.fetcher import run_fetch

        return run_fetch(args)
    if command == "serve":
        config_file = args.pop("config")
        try:
            config = Config.load(cli=args, environ=os.environ, config_file=config_file)
        except ConfigError as exc:
            print(f"relay: configuration error: {exc}", file=sys.stderr)
            return 2
        if not config.routes:
            print(
                "relay: no routes configured; give at least one --route PREFIX=URL "
                f"(or {env_var('routes')}, or [[routes]] in --config)",
                file=sys.stderr,
            )
            return 2
        from relay.server.run import serve  # imported late: uvicorn is not needed for --help

        try:
            return serve(config)
        except StartupError as exc:
            print(f"relay: cannot start: {exc}", file=sys.stderr)
            return 1
    parser.error(f"unknown command {command}")  # pragma: no cover - argparse enforces choices
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
