"""docs/configuration.md is generated from the settings' own metadata and kept in step."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.machinery
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

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
        # Resolved from auth_env/auth_file or username_env/password_env, never configured.
        if f.name not in ("credential", "registry_credential"):
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


LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)
ANCHOR = re.compile(r'<a id="([^"]+)">')


def anchors(page: Path) -> set[str]:
    """The fragments a Markdown page answers to on GitHub: its headings' slugs and ids."""
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    slugs = {
        re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        for heading in HEADING.findall(text)
    }
    return slugs | set(ANCHOR.findall(text))


@pytest.mark.parametrize(
    "page", sorted([*(ROOT / "docs").glob("*.md"), ROOT / "README.md"]), ids=lambda p: p.name
)
def test_relative_links_reach_a_file_and_an_anchor(page: Path) -> None:
    """The README is being cut into docs/: a moved section must not leave links behind."""
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists() or (
            fragment and linked.suffix == ".md" and fragment not in anchors(linked)
        ):
            broken.append(target)
    assert broken == [], f"{page.relative_to(ROOT)}: broken links"
