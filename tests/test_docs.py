"""docs/configuration.md is generated from the settings' own metadata and kept in step."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
from pathlib import Path
from types import ModuleType

from relay.cli import build_parser
from relay.config import Route, cli_flag, routes_setting, settings

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def gen_docs() -> ModuleType:
    """scripts/gen-docs, imported (it has no .py suffix, so by its loader)."""
    loader = importlib.machinery.SourceFileLoader("gen_docs", str(ROOT / "scripts" / "gen-docs"))
    spec = importlib.util.spec_from_loader("gen_docs", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_configuration_reference_matches_the_code() -> None:
    rendered = gen_docs().render()
    assert PAGE.read_text() == rendered, (
        "docs/configuration.md disagrees with the settings in relay/config.py: "
        "run scripts/gen-docs and commit the result"
    )


def test_the_reference_has_every_setting_and_route_key() -> None:
    page = gen_docs().render()
    for f in settings():
        assert f'<a id="{f.name}"></a>' in page, f.name
        assert f"`{cli_flag(f.name)}`" in page, f.name
    for f in dataclasses.fields(Route):
        if f.name != "credential":  # resolved from auth_env/auth_file, never configured
            assert f'<a id="route-{f.name}"></a>' in page, f.name


def test_the_cli_help_is_the_same_text() -> None:
    """One source: each option's help in `relay serve --help` starts with the setting's."""
    serve = next(
        action.choices["serve"]
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
    )
    helps = {action.dest: action.help or "" for action in serve._actions}
    for f in [*settings(), routes_setting()]:
        assert helps[f.name].startswith(f.metadata["help"]), f.name
