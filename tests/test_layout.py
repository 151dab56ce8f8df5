"""The layers of DESIGN A1 hold: no import cycle, no upward import, no lazy import but the public face's.

Two independent checks: the imports written in the code (every ``import``
statement outside ``if TYPE_CHECKING:``, at module level or inside a
function), and what importing a low-layer module in a fresh interpreter
really loads.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("schemas", "pipeline", "stages")

#: The layers, bottom first (DESIGN A1): a module may import its own layer and the ones below.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("schemas", ("schemas",)),
    ("vocabulary", ("pipeline.errors", "pipeline.data")),
    ("bus", ("pipeline.bus",)),
    ("runtime", ("pipeline.runtime",)),
    ("rules", ("stages.rules",)),
    ("stores", ("pipeline.stores",)),
    ("emulator", ("pipeline.emulator",)),
    (
        "stages",
        (
            "stages",
            "stages.providers",
            "stages.cache",
            "stages.budget",
            "stages.router",
            "stages.executor",
            "stages.recorder",
            "stages.breaker",
            "stages.health",
            "stages.archive",
        ),
    ),
    ("assembly", ("pipeline.assembly",)),
    ("client", ("pipeline.client",)),
    ("serve, bench", ("pipeline.serve", "pipeline.bench")),
    ("cli", ("pipeline.cli",)),
)

#: The stage packages: none imports another (``stages.providers`` is imported by the stages that call providers).
STAGE_PACKAGES = tuple(
    f"stages.{n}" for n in ("cache", "budget", "router", "executor", "recorder", "breaker", "health", "archive")
)

#: The public face: it may name the client lazily (PEP 562) and under ``TYPE_CHECKING``.
FACE = "pipeline"
#: Package containers outside every layer: the face, and ``stages/__init__.py`` (a docstring only).
CONTAINERS = frozenset({FACE, "stages"})


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` of the longest prefix naming ``module`` (a container is in none: -1)."""
    if module in CONTAINERS:
        return -1
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of DESIGN A1: add its folder to LAYERS")
    return best


def _stage_package(module: str) -> str | None:
    return next((p for p in STAGE_PACKAGES if module == p or module.startswith(p + ".")), None)


class Import:
    """One import of a project module: who, what, where, and whether it runs inside a function."""

    def __init__(self, importer: str, imported: str, line: int, lazy: bool) -> None:
        self.importer, self.imported, self.line, self.lazy = importer, imported, line, lazy

    def __repr__(self) -> str:
        where = "inside a function" if self.lazy else "at module level"
        return f"{MODULES[self.importer].relative_to(ROOT)}:{self.line} {self.importer} -> {self.imported} ({where})"


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if MODULES[importer].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _imports() -> list[Import]:
    out: list[Import] = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        type_only: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                type_only.update(id(n) for n in ast.walk(node))
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if id(node) in type_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for target in targets:
                if target.split(".")[0] in PACKAGES and target != module:
                    # ``import a.b.c`` loads a, a.b and a.b.c: the deepest project module stands for them
                    while target not in MODULES and "." in target:
                        target = target.rsplit(".", 1)[0]
                    out.append(Import(module, target, node.lineno, id(node) not in module_level))
    return out


IMPORTS = _imports()


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_no_upward_import() -> None:
    upward = [imp for imp in IMPORTS if imp.importer != FACE and layer_of(imp.imported) > layer_of(imp.importer)]
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(map(repr, upward))


def test_no_stage_imports_another_stage() -> None:
    crossing = []
    for imp in IMPORTS:
        if not imp.importer.startswith("stages."):
            continue
        mine, theirs = _stage_package(imp.importer), _stage_package(imp.imported)
        if theirs is not None and mine != theirs:
            crossing.append(imp)
    assert crossing == [], "a stage (or a provider adapter) imports a stage:\n" + "\n".join(map(repr, crossing))


def test_only_the_public_face_imports_lazily() -> None:
    lazy = [imp for imp in IMPORTS if imp.lazy and imp.importer != FACE]
    assert lazy == [], "project imports inside functions (move the fact down instead):\n" + "\n".join(map(repr, lazy))


def test_no_import_cycle() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for imp in IMPORTS:
        graph[imp.importer].add(imp.imported)
    # Tarjan's strongly connected components, iteratively
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    cycles: list[list[str]] = []
    counter = 0
    for start in MODULES:
        if start in index:
            continue
        work: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            if children:
                child = children.pop()
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, sorted(graph[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    assert cycles == [], f"import cycles: {cycles}"


def test_the_check_sees_an_upward_import() -> None:
    """The rules above would catch a violation: the bus importing the client is upward."""
    assert layer_of("pipeline.client.manager") > layer_of("pipeline.bus.kafka")
    assert layer_of("stages.rules.pricing") < layer_of("stages.router.stage")
    assert (
        layer_of("pipeline.runtime.runner") < layer_of("stages.rules.ledger") < layer_of("pipeline.stores.budget_store")
    )
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("pipeline.somewhere_new")


# --- what a fresh interpreter loads ----------------------------------------------------------------

#: Every module below the top layer is imported alone in a fresh interpreter.
LOW_MODULES = sorted(m for m in MODULES if m not in CONTAINERS and layer_of(m) < layer_of("pipeline.cli"))

_PROBE = """
import importlib, json, sys
importlib.import_module(sys.argv[1])
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("schemas", "pipeline", "stages"))))
"""


def _loaded_by(module: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, module], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"importing {module} alone failed:\n{done.stderr[-2000:]}")
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_a_fresh_interpreter_loads_no_higher_layer() -> None:
    with ThreadPoolExecutor(max_workers=4) as pool:
        loaded = dict(zip(LOW_MODULES, pool.map(_loaded_by, LOW_MODULES), strict=True))
    higher = {
        module: [m for m in mods if m in MODULES and layer_of(m) > layer_of(module)] for module, mods in loaded.items()
    }
    higher = {module: mods for module, mods in higher.items() if mods}
    assert higher == {}, f"modules that load a higher layer when imported alone: {higher}"
    # the public face names the client but does not load it for a low layer
    assert "pipeline.client.manager" not in loaded["pipeline.bus.protocol"]
    assert "pipeline.errors" in loaded["pipeline.bus.protocol"]


# --- the README's map ----------------------------------------------------------------------------


def _readme_map() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Code layout", 1)[1].split("\n### ", 1)[0]
    paths: list[str] = []
    for line in section.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            paths += [p for p in first_cell.split("`")[1::2]]
    return paths


def test_the_readme_map_matches_the_tree() -> None:
    mapped = _readme_map()
    assert mapped, "README.md has no Code layout table"
    for path in mapped:
        if "<stage>" in path:
            continue
        assert (ROOT / path).exists(), f"README's Code layout names {path}, which does not exist"
    packages = sorted(
        str(init.parent.relative_to(ROOT)) + "/"
        for top in ("pipeline", "stages")
        for init in (ROOT / top).glob("*/__init__.py")
    )
    stage_dirs = {f"stages/{p.split('.')[1]}/" for p in STAGE_PACKAGES}
    unmapped = [p for p in packages if p not in mapped and p not in stage_dirs]
    assert unmapped == [], f"folders missing from README's Code layout: {unmapped}"
    assert "stages/<stage>/" in mapped
