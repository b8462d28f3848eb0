"""The shape of the code, kept by tests: no import circles, kernels independent of fmchat, no capability probes
on backends, one registry per list of choices (docs/architecture.md)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"fmchat": REPO / "fmchat", "fmchat_kernels": REPO / "kernels"}


def _modules() -> dict[str, Path]:
    """Every module of the two packages by its import name (packages as their __init__)."""
    out = {}
    for pkg, root in ROOTS.items():
        for path in root.rglob("*.py"):
            parts = [pkg, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere (module level or in functions), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_lines(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for a in node.names:  # "from pkg import submodule" imports the submodule; a name, the module
                targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod)
    found = set()
    for t in targets:
        while t and t not in known:
            t = t.rpartition(".")[0]
        if not t or t == name:
            continue
        found.add(t)
        # Importing a.b.c runs a and a.b first: count those packages unless they contain the importer.
        parts = t.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in known and not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_circles():
    graph = _graph()
    assert "fmchat.cli" in graph and (REPO / "fmchat" / "cli" / "__init__.py").is_file()  # the CLI is a package
    assert "fmchat.errors" in graph and graph["fmchat.errors"] == set()  # errors import nothing of ours
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = _graph()
    graph["fmchat.errors"] = {"fmchat.cli"}  # cli imports errors (through app.py), so this closes a circle
    assert any("fmchat.errors" in c for c in _cycles(graph))


def test_kernels_never_import_fmchat():
    graph = _graph()
    for name, deps in graph.items():
        if name.startswith("fmchat_kernels"):
            assert all(d.startswith("fmchat_kernels") for d in deps), (name, deps)


def test_leaf_modules_stay_leaves():
    graph = _graph()
    assert graph["fmchat.registry"] <= {"fmchat.errors"}
    assert graph["fmchat.tokens"] == set()
    assert graph["fmchat.templates"] <= {"fmchat.errors", "fmchat.gguf_header"}  # the config validates --chat-template with it
    assert graph["fmchat.gguf_header"] == set()  # GGUF header values, standard library only
    # The engine does not know about the CLI, the app, the store or the service above it.
    for name, deps in graph.items():
        if name.startswith(("fmchat.engine", "fmchat.backends", "fmchat.context")):
            above = {d for d in deps if d.startswith(("fmchat.cli", "fmchat.tui", "fmchat.store", "fmchat.conversation", "fmchat.bench"))}
            assert not above, (name, above)


PROBE = re.compile(r"\b(getattr|hasattr)\(\s*(self\.)?(session\.|self\.session\.)?(backend|b)\b")


def test_no_capability_probes_on_backends():
    """Callers ask a backend what it can do with isinstance on the capability classes, never by probing."""
    hits = []
    for path in (REPO / "fmchat").rglob("*.py"):
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if PROBE.search(line):
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert hits == []


def test_every_list_of_choices_lives_in_one_registry():
    from fmchat import config, registry

    assert set(config.CHOICE_FIELDS) == {r.kind for r in registry.ALL}
    for reg in registry.ALL:
        assert reg.names(), reg.kind
        for c in reg.choices():
            assert c.label and (c.available or c.reason), (reg.kind, c)
