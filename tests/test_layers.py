"""The package's layering, checked on the source: no import runs back up a layer, and no
program imports a sibling program. Changing a layer here is a design decision, not a fix."""

from __future__ import annotations

import ast
from pathlib import Path

import relay

ROOT = Path(relay.__file__).parent

# Lower layers first. A module may import from its own layer's package or any lower layer.
LAYERS: list[tuple[str, ...]] = [
    (
        "relay.types",
        "relay.errors",
        "relay.credentials",
        "relay.http",
        "relay.net.addresses",
        "relay.disk",
    ),
    # Fetching a URL into a verified, resumable file, for the downloads and `relay fetch`:
    # as low as its imports allow, so it cannot reach routes, credentials or the egress policy
    # (each program opens the requests).
    ("relay.transfer",),
    ("relay.config",),
    ("relay.net",),
    # Three programs side by side: none imports another.
    ("relay.proxy", "relay.downloads", "relay.fetch"),
    # The cache serves relayed requests: it builds on the proxy's pieces.
    ("relay.cache",),
    ("relay.server",),
    ("relay.cli", "relay.__main__"),
]
SIBLINGS = {"relay.proxy", "relay.downloads", "relay.fetch"}


def _home(module: str) -> tuple[int, str]:
    """(layer, unit): the most specific LAYERS entry the module falls under."""
    best: tuple[int, str] | None = None
    for level, units in enumerate(LAYERS):
        for unit in units:
            if (module == unit or module.startswith(unit + ".")) and (
                best is None or len(unit) > len(best[1])
            ):
                best = (level, unit)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "relay":
                # `from relay import __version__` is the package's leaf value; modules
                # imported this way are checked by name.
                found.update(f"relay.{a.name}" for a in node.names if not a.name.startswith("__"))
            else:
                found.add(node.module)
    return {name for name in found if name == "relay" or name.startswith("relay.")}


def test_no_import_runs_up_a_layer_or_across_programs() -> None:
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        if module == "relay":
            continue  # the package's lazy exports (TYPE_CHECKING imports only)
        level, unit = _home(module)
        for imported in sorted(_imports(path)):
            if imported == "relay":
                continue
            their_level, their_unit = _home(imported)
            if their_level > level:
                problems.append(f"{module} imports {imported} from a higher layer")
            elif their_level == level and their_unit != unit and unit in SIBLINGS:
                problems.append(f"{module} imports {imported} from a sibling program")
    assert problems == []


def test_every_module_has_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        if _module_name(path) != "relay":
            _home(_module_name(path))


#: The most lines a module of `relay/cache/` holds: one concept each (issue 21). A module
#: that outgrows it holds two: split it rather than raise this.
CACHE_MODULE_LINES = 600


def test_no_cache_module_outgrows_one_concept() -> None:
    sizes = {
        path.name: len(path.read_text().splitlines())
        for path in sorted((ROOT / "cache").glob("*.py"))
    }
    assert {name: n for name, n in sizes.items() if n > CACHE_MODULE_LINES} == {}
