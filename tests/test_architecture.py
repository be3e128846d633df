"""The package's layers (docs/design.md): every arrow between lit_qlearn's modules points
down. The imports are read with ``ast`` (at module level and inside functions), never
executed, so a cycle that only a function-level import hides is found too.

Layers, bottom to top: the shared types (``data.types``); the maths (td, targets,
networks, ntk, plasticity, forecast), then the probe protocol and the loggers; the
measuring core (``monitoring``: meters that know nothing of a Trainer); data
(reads and serves); evaluation; algorithms; callbacks and, beside them, integrations (the
meters in other RL libraries); datasets (makes data); demo, cli and toys (small problems
for tests and demos, built on the algorithms).

Run as a script for the import map (modules and their lines, cycles, upward arrows),
e.g. of the last commit beside the working tree::

    git archive HEAD lit_qlearn | tar -x -C /tmp/head_src
    python tests/test_architecture.py /tmp/head_src     # default: this checkout
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "lit_qlearn"

MATHS = ("td", "targets", "networks", "ntk", "plasticity", "forecast")
# Rank of each layer: an import from a module to one of higher rank is an upward arrow.
# ``data.types`` (Transitions, DataSpec: shapes every layer passes around) sits under the
# maths; the package root (which holds only ``__version__``) is its own module, not a prefix.
LAYERS = [
    (0, "types", (f"{PACKAGE}.data.types",)),
    (1, "maths", tuple(f"{PACKAGE}.{m}" for m in MATHS)),
    (2, "probe", (f"{PACKAGE}.probe", f"{PACKAGE}.loggers")),
    # monitoring: the measuring core (probe set, meters, their state and the crash verdict) on the
    # probe protocol and the maths, without Lightning, so that the callbacks and plain loops share it
    (3, "monitoring", (f"{PACKAGE}.monitoring",)),
    (4, "data", (f"{PACKAGE}.data",)),
    (5, "evaluation", (f"{PACKAGE}.evaluation",)),
    (6, "algorithms", (f"{PACKAGE}.algorithms",)),
    (7, "callbacks", (f"{PACKAGE}.callbacks",)),
    # integrations: the meters adapted to other libraries (Stable-Baselines3), beside the callbacks
    # (Lightning's adapters) at their rank; what they may import is INTEGRATION_DEPS
    (7, "integrations", (f"{PACKAGE}.integrations",)),
    (8, "datasets", (f"{PACKAGE}.datasets",)),
    # toys: small problems built on the algorithms (a QLearningModule, a DataModule, an env) for tests and demos
    (9, "top", (f"{PACKAGE}.demo", f"{PACKAGE}.cli", f"{PACKAGE}.toys")),
]
# (b) what data may never import: the layers that use it
DATA_FORBIDDEN = tuple(f"{PACKAGE}.{m}" for m in ("algorithms", "datasets", "evaluation", "callbacks", "demo", "cli"))
# (c) all that callbacks may import from lit_qlearn (besides each other); data.types is
# the batch type a callback reads (the probe protocol's own type, see LAYERS); targets is
# the one target-update rule, which EMATarget installs; monitoring is the measuring core
# the monitors adapt to a Trainer
CALLBACK_DEPS = tuple(f"{PACKAGE}.{m}" for m in ("ntk", "plasticity", "probe", "forecast", "targets", "callbacks",
                                               "data.types", "monitoring"))
# (e) all that integrations may import from lit_qlearn: the measuring core and what it is
# made of (never an algorithm, a callback or Lightning: a user of SB3 needs none of them)
INTEGRATION_DEPS = tuple(f"{PACKAGE}.{m}" for m in ("monitoring", "probe", "ntk", "data.types", "integrations"))
LIGHTNING = ("lightning", "pytorch_lightning")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``source``'s line ``line`` (``top``: at module level)."""

    source: str
    target: str
    line: int
    top: bool

    def __str__(self) -> str:
        where = "module level" if self.top else "in a function"
        return f"{self.source} -> {self.target} (line {self.line}, {where})"


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Every module of the package under ``root`` by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def imports(name: str, path: Path) -> list[tuple[str, int, bool]]:
    """``(imported dotted name, line, at module level)`` for every import in the file: for
    ``from a import b`` the name ``a.b`` (which may be a module or a name in ``a``)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top = {id(node) for node in tree.body}
    # an import nested in `if` / `try` at module level still runs on import
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            found += [(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno, id(node) in top)
                      for alias in node.names]
    return found


def graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge], list[Edge]]:
    """(modules, edges between the package's modules, imports of Lightning). An imported
    name is attributed to the longest module it names (``from lit_qlearn.data import
    offline`` is the module ``lit_qlearn.data.offline``, ``from lit_qlearn.data import
    OfflineDataModule`` the package ``lit_qlearn.data``)."""
    mods = modules(root)
    edges, lightning = [], []
    for name, path in mods.items():
        for target, line, top in imports(name, path):
            if _within(target, LIGHTNING):
                lightning.append(Edge(name, target.partition(".")[0], line, top))
            if not _within(target, (PACKAGE,)):
                continue
            parts = target.split(".")
            while ".".join(parts) not in mods:
                parts.pop()
            target = ".".join(parts)
            if target != name:
                edges.append(Edge(name, target, line, top))
    return mods, sorted(set(edges), key=str), sorted(set(lightning), key=str)


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    succ: dict[str, set[str]] = {}
    for e in edges:
        succ.setdefault(e.source, set()).add(e.target)
        succ.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(succ[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(succ):
        if v not in index:
            visit(v)
    return sorted(found)


def layer(name: str) -> tuple[int, str]:
    """(rank, layer name) of a module; the most specific prefix wins (``data.types``).
    The package root is below everything; a module in no layer is (-1, "?")."""
    if name == PACKAGE:
        return -1, "root"
    best = max(((len(p), rank, label) for rank, label, prefixes in LAYERS for p in prefixes if _within(name, (p,))),
               default=(0, -1, "?"))
    return best[1], best[2]


def upward(edges: list[Edge]) -> list[Edge]:
    """Edges from a module to one of a higher layer."""
    return [e for e in edges if layer(e.target)[0] > layer(e.source)[0]]


def _cycle_edges(edges: list[Edge]) -> list[str]:
    lines = []
    for component in cycles(edges):
        inside = [str(e) for e in edges if e.source in component and e.target in component]
        lines.append(f"cycle {' <-> '.join(component)}:\n    " + "\n    ".join(inside))
    return lines


def report(root: Path = ROOT) -> str:
    """The import map of the package under ``root``, as text."""
    mods, edges, lightning = graph(root)
    out = [f"import map of {root / PACKAGE}"]
    sizes = {name: len(path.read_text().splitlines()) for name, path in mods.items()}
    out.append(f"modules: {len(mods)}, lines: {sum(sizes.values())}")
    for name in sorted(mods, key=lambda n: (layer(n)[0], n)):
        deps = sorted({e.target for e in edges if e.source == name})
        short = [d.removeprefix(PACKAGE + ".") for d in deps]
        out.append(f"  [{layer(name)[1]:>10}] {name:<36} {sizes[name]:>5} lines  -> {', '.join(short) or '-'}")
    found = _cycle_edges(edges)
    out.append(f"cycles: {len(found)}")
    out += ["  " + c for c in found]
    up = upward(edges)
    out.append(f"upward arrows: {len(up)}")
    out += [f"  {e}  [{layer(e.source)[1]} -> {layer(e.target)[1]}]" for e in up]
    inner = [e for e in edges if not e.top]
    out.append(f"imports of lit_qlearn modules inside functions: {len(inner)}")
    return "\n".join(out)


# ----------------------------------------------------------------------------- tests

_MODS, _EDGES, _LIGHTNING = graph()


def test_the_walk_finds_the_packages_known_imports():
    # the walk itself: a relative, a function-level and a `from package import module` import
    assert {f"{PACKAGE}.data", f"{PACKAGE}.data.offline", f"{PACKAGE}.cli"} <= set(_MODS)
    assert Edge(f"{PACKAGE}.data", f"{PACKAGE}.data.offline", _line(f"{PACKAGE}.data", "offline import"),
                True) in _EDGES
    assert any(e.source == f"{PACKAGE}.cli" and not e.top for e in _EDGES)
    assert cycles([Edge("a", "b", 1, True), Edge("b", "c", 1, False), Edge("c", "a", 1, True),
                   Edge("c", "d", 1, True)]) == [["a", "b", "c"]]


def _line(module: str, text: str) -> int:
    lines = _MODS[module].read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


def test_every_module_is_in_a_layer():
    unplaced = [name for name in _MODS if name != PACKAGE and layer(name)[1] == "?"]
    assert not unplaced, f"modules in no layer of LAYERS (place them, docs/design.md): {unplaced}"


def test_no_import_cycle():
    found = _cycle_edges(_EDGES)
    assert not found, "import cycles between lit_qlearn modules:\n" + "\n".join(found)


def test_every_arrow_points_down():
    up = upward(_EDGES)
    assert not up, "upward imports:\n" + "\n".join(f"{e}  [{layer(e.source)[1]} -> {layer(e.target)[1]}]" for e in up)


def test_data_reads_and_never_imports_the_layers_that_use_it():
    bad = [e for e in _EDGES if _within(e.source, (f"{PACKAGE}.data",)) and _within(e.target, DATA_FORBIDDEN)]
    assert not bad, "lit_qlearn.data imports a layer above it:\n" + "\n".join(map(str, bad))


def test_callbacks_depend_on_ntk_plasticity_probe_forecast_only():
    bad = [e for e in _EDGES if _within(e.source, (f"{PACKAGE}.callbacks",)) and not _within(e.target, CALLBACK_DEPS)]
    assert not bad, "callbacks import beyond ntk / plasticity / probe / forecast:\n" + "\n".join(map(str, bad))


def test_the_maths_never_imports_lightning():
    maths = tuple(f"{PACKAGE}.{m}" for m in MATHS)
    bad = [e for e in _LIGHTNING if e.source in maths]
    assert not bad, "maths modules importing Lightning:\n" + "\n".join(map(str, bad))


def test_the_measuring_core_never_imports_lightning():
    bad = [e for e in _LIGHTNING if _within(e.source, (f"{PACKAGE}.monitoring",))]
    assert not bad, "lit_qlearn.monitoring imports Lightning (plain loops must not need it):\n" + "\n".join(
        map(str, bad))


def test_integrations_depend_on_the_measuring_core_only_and_never_on_lightning():
    bad = [e for e in _EDGES if _within(e.source, (f"{PACKAGE}.integrations",))
           and not _within(e.target, INTEGRATION_DEPS)]
    bad += [e for e in _LIGHTNING if _within(e.source, (f"{PACKAGE}.integrations",))]
    assert not bad, "integrations import beyond monitoring / probe / ntk / data.types:\n" + "\n".join(map(str, bad))


if __name__ == "__main__":
    print(report(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT))
