"""The house rules of docs/architecture.md, checked on the source: imports follow the layer order, no import cycle,
no module over 500 lines, no private name imported from another module, nothing unpickled outside the opt-in
loader. Read from the code with `ast` (nothing is imported), so a violation names the file and line."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500

# module prefix -> layer; a module may import its own layer or a lower one. Longest prefix wins.
LAYERS = {
    "nha_plugin.spec": 0,
    "nha_plugin.adapters": 1, "nha_plugin.zoo": 1,
    "nha_plugin.adapters.transformer_lens": 6, "nha_plugin.adapters.zennit": 6,   # ecosystem front doors
    "nha_plugin.pool": 2,
    "nha_plugin.pool_maps": 3,
    "nha_plugin.decomposition": 4,
    "nha_plugin.readout": 5, "nha_plugin.hooks": 5, "nha_plugin.models": 5,
    "nha_plugin.readout_attribution": 6, "nha_plugin.attribution": 6, "nha_plugin.text": 6, "nha_plugin.stats": 6,
    "nha_plugin.vit": 6,
    "nha_plugin.harness": 7,
    "nha_plugin.applications": 8,
    "nha_plugin.cli": 9, "nha_plugin.__main__": 9,
    "nha_plugin.report": 9,                      # beside cli: the static site over harness, text and stats
}
# utilities every layer may use; they import nothing of the package above them
UTILITIES = ("nha_plugin.files", "nha_plugin.runs", "nha_plugin.images", "nha_plugin.version", "nha_plugin.markup", "nha_plugin.scenes", "nha_plugin.datasets")
# the package's face loads everything lazily; the opt-in pickle loader lives in models.py
FACE = "nha_plugin"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "nha_plugin").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "adapters").rglob("*.py")):
        parts = ("nha_plugin", "adapters") + path.relative_to(ROOT / "adapters").with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def _imports(name: str) -> list[tuple[str, int, list[str]]]:
    """(imported module, line, imported names) for every import in module ``name`` outside TYPE_CHECKING blocks."""
    tree = ast.parse(MODULES[name].read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    base = name if _is_package(name) else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno, []) for a in node.names if a.name.startswith("nha_plugin")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base.split(".")[: len(base.split(".")) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("nha_plugin"):
                continue
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if submodules:
                out += [(m, node.lineno, []) for m in submodules]
            if len(submodules) < len(names):
                out.append((target, node.lineno, [n for n in names if f"{target}.{n}" not in MODULES]))
    return out


def _layer(name: str):
    if name == FACE or name.startswith(UTILITIES):
        return None
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    return LAYERS[best] if best else None


def test_no_module_imports_the_package_face():
    """Inside the package, names come from the module that defines them, not through ``nha_plugin``'s lazy face
    (which would hide the real dependency from this test and from readers)."""
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line}" for m in MODULES if m != FACE
           for t, line, _ in _imports(m) if t == FACE]
    assert not bad, f"modules importing nha_plugin itself: {bad}"


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if m != FACE and not m.startswith(UTILITIES) and _layer(m) is None]
    assert not missing, f"modules without a layer in docs/architecture.md (add them to LAYERS): {missing}"


def test_imports_follow_the_layer_order():
    bad = []
    for name in MODULES:
        for target, line, _ in _imports(name):
            if name.startswith(UTILITIES) and not target.startswith(UTILITIES):
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} utility imports {target}")
            lo, hi = _layer(target), _layer(name)
            if lo is not None and hi is not None and lo > hi:
                bad.append(f"{MODULES[name].relative_to(ROOT)}:{line} (layer {hi}) imports {target} (layer {lo})")
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in _imports(m) if t in MODULES and t != m}) for m in MODULES}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):                                         # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in graph:
        if m not in index:
            visit(m)
    # a package's __init__ importing its own submodules, which import siblings through the package, is not a cycle
    # of concepts; everything else is
    real = [c for c in cycles if not all(x == c[0] or x.startswith(c[0] + ".") for x in c)]
    assert not real, f"import cycles: {real}"


def test_no_module_over_the_size_limit():
    big = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them along their seams): {big}"


def test_no_private_name_crosses_modules():
    bad = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {n} from {t}"
           for m in MODULES for t, line, names in _imports(m) for n in names
           if n.startswith("_") and not n.startswith("__") and t != m]
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


@pytest.mark.parametrize("pattern, allowed", [
    (r"torch\.load\((?![^)]*weights_only\s*=\s*True)", {"nha_plugin/models.py"}),   # the opt-in loader only
    (r"\bpickle\.loads?\(", set()),
    (r"torch\.save\(", set()),
])
def test_nothing_unpickled_from_disk(pattern, allowed):
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in MODULES.values() if str(p.relative_to(ROOT)) not in allowed
            for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not hits, f"{pattern!r} outside {sorted(allowed) or 'anywhere'}: {hits}"


def test_every_package_is_installed():
    """pyproject lists packages explicitly (the adapters folder is mapped in): a package missing from the list
    would be absent from the wheel while every test in the checkout still passes."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {m for m, p in MODULES.items() if p.name == "__init__.py"}
    assert found == listed, f"packages missing from pyproject: {sorted(found - listed)}; listed but absent: " \
                            f"{sorted(listed - found)}"
