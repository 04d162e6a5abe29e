"""The command line: a thin layer mapping options onto Config and running the server."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from relay import __version__
from relay.config import ENV_PREFIX, Config, settings
from relay.errors import ConfigError


def _serve_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the relay server",
        description="Run the relay. Settings come from (lowest to highest precedence) the "
        f"TOML file, {ENV_PREFIX}* environment variables, then these options.",
    )
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument(
        "--route",
        dest="routes",
        action="append",
        metavar="PREFIX=URL",
        help="serve PREFIX from the upstream base URL (repeatable), e.g. /gh/=https://github.com/",
    )
    for f in settings():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default}; env {ENV_PREFIX}{f.name.upper()})"
        if "choices" in f.metadata:
            p.add_argument(flag, dest=f.name, choices=f.metadata["choices"], help=help_text)
        else:
            p.add_argument(flag, dest=f.name, metavar=f.name.split("_")[-1].upper(), help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Streaming file-download relay.")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
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
                f"(or {ENV_PREFIX}ROUTES, or [[routes]] in --config)",
                file=sys.stderr,
            )
            return 2
        from relay.server import serve  # imported late: uvicorn is not needed for --help

        serve(config)
        return 0
    parser.error(f"unknown command {command}")  # pragma: no cover - argparse enforces choices
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
