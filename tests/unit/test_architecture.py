"""The package's import graph: no cycles, and no import from a lower layer to a higher one.

The layer order is read from the block in CONTRIBUTING.md (written once, there). Imports are parsed with
``ast`` from every file of ``rlhf_kit/``: module level, inside functions and under ``TYPE_CHECKING``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- layers: parsed by tests/unit/test_architecture.py -->"


def parse_layers(text: str) -> list[tuple[str, list[str]]]:
    """``[(layer name, [module or package names])]``, lowest first, from the fenced block after MARKER."""
    if MARKER not in text:
        raise ValueError(f"no layer block: the marker {MARKER!r} is missing")
    block = text.split(MARKER, 1)[1].split("```", 2)[1]
    layers = []
    for line in block.splitlines()[1:]:  # the first line is the fence's language tag
        if not line.strip():
            continue
        m = re.fullmatch(r"\s*(\d+)\.\s+([\w-]+):\s+(.+)", line)
        if m is None or int(m.group(1)) != len(layers) + 1:
            raise ValueError(f"layer block: cannot read {line!r} (want '<n>. <name>: <modules>')")
        layers.append((m.group(2), m.group(3).split()))
    return layers


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}`` for every ``.py`` file under the package ``root``.

    ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``;
    relative imports are resolved. Importing ``a.b`` is not counted as importing ``a``'s ``__init__``.
    """
    files = {module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                subs = {f"{mod}.{a.name}" for a in node.names} & files.keys()
                deps |= subs or {mod}
        graph[name] = {d for d in deps if d == top or d.startswith(top + ".")} - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def layer_of(module: str, layers: list[tuple[str, list[str]]], top: str) -> int | None:
    """0-based layer of ``module``: the layer naming it or its longest enclosing package (the root
    ``top`` names its ``__init__`` only); None when no layer names it."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(layers):
        for n in names:
            covers = module == n or (n != top and module.startswith(n + "."))
            if covers and len(n) > best_len:
                best, best_len = i, len(n)
    return best


def layer_violations(graph: dict[str, set[str]], layers, top: str) -> list[str]:
    """One line per module no layer names and per import from a lower layer to a higher one."""
    problems = []
    for mod in sorted(graph):
        lm = layer_of(mod, layers, top)
        if lm is None:
            problems.append(f"{mod}: in no layer of CONTRIBUTING.md")
            continue
        for dep in sorted(graph[mod]):
            ld = layer_of(dep, layers, top)
            if ld is not None and ld > lm:
                problems.append(f"{mod} (layer {layers[lm][0]}) imports {dep} (higher layer {layers[ld][0]})")
    return problems


@pytest.fixture(scope="module")
def layers():
    return parse_layers((ROOT / "CONTRIBUTING.md").read_text())


@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT / "rlhf_kit")


def test_contributing_lists_the_layers(layers):
    names = [n for n, _ in layers]
    assert names[0] == "root" and "ppo" in names and names.index("data") < names.index("ppo")
    listed = [m for _, mods in layers for m in mods]
    assert len(listed) == len(set(listed)), "a module is listed in two layers"


def test_no_import_cycles(graph):
    assert "rlhf_kit.ppo.experience" in graph and graph["rlhf_kit.ppo.experience"]  # the parse saw files
    assert find_cycles(graph) == []


def test_imports_go_down_the_layers(graph, layers):
    assert layer_violations(graph, layers, "rlhf_kit") == []


def test_ppo_never_imports_serving(graph):
    """The critic server enters ppo through the CriticInference protocol."""
    bad = {m: d for m, d in graph.items() if m.startswith("rlhf_kit.ppo") and any("serving" in x for x in d)}
    assert bad == {}


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root / "pkg"


SYNTHETIC_LAYERS = """
<!-- layers: parsed by tests/unit/test_architecture.py -->
```text
1. root:  pkg
2. low:   pkg.low pkg.util
3. high:  pkg.high
```
"""


def test_checker_finds_planted_cycle_and_upward_import(tmp_path):
    layers = parse_layers(SYNTHETIC_LAYERS)
    assert layers == [("root", ["pkg"]), ("low", ["pkg.low", "pkg.util"]), ("high", ["pkg.high"])]
    clean = {
        "pkg/__init__.py": "",
        "pkg/util.py": "X = 1\n",
        "pkg/low/__init__.py": "from pkg.low.a import A\n",
        "pkg/low/a.py": "from pkg import util\nA = util.X\n",
        "pkg/high.py": "from .low import a\nimport pkg.util\n",
    }
    pkg = _write(tmp_path / "clean", clean)
    g = import_graph(pkg)
    assert g["pkg.high"] == {"pkg.low.a", "pkg.util"}  # relative import resolved to the submodule
    assert g["pkg.low.a"] == {"pkg.util"}  # `from pkg import util` is the submodule, not pkg's __init__
    assert find_cycles(g) == [] and layer_violations(g, layers, "pkg") == []

    # a cycle inside one layer, through an import under TYPE_CHECKING: found, and nothing else
    cyclic = dict(clean)
    cyclic["pkg/util.py"] = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.low.a import A\n"
    )
    g = import_graph(_write(tmp_path / "cyclic", cyclic))
    assert find_cycles(g) == [["pkg.low.a", "pkg.util"]]
    assert layer_violations(g, layers, "pkg") == []

    # an upward import hidden in a function, and a module that no layer names
    upward = dict(clean)
    upward["pkg/high.py"] = "import pkg.util\n"
    upward["pkg/low/a.py"] += "def f():\n    from ..high import thing\n"
    upward["pkg/stray.py"] = ""
    g = import_graph(_write(tmp_path / "upward", upward))
    assert find_cycles(g) == []
    assert layer_violations(g, layers, "pkg") == [
        "pkg.low.a (layer low) imports pkg.high (higher layer high)",
        "pkg.stray: in no layer of CONTRIBUTING.md",  # the root covers its __init__ only
    ]

    # both at once: the upward import closes a cycle across the layers
    both = dict(clean)
    both["pkg/low/a.py"] += "def f():\n    import pkg.high\n"
    g = import_graph(_write(tmp_path / "both", both))
    assert find_cycles(g) == [["pkg.high", "pkg.low.a"]]
    assert layer_violations(g, layers, "pkg") == [
        "pkg.low.a (layer low) imports pkg.high (higher layer high)"
    ]


def test_layer_block_errors_name_the_line():
    with pytest.raises(ValueError, match="marker"):
        parse_layers("no block here")
    with pytest.raises(ValueError, match="'3. high pkg.high'"):
        parse_layers(SYNTHETIC_LAYERS.replace("3. high:  pkg.high", "3. high pkg.high"))


def _code_lines(lines: list[str]) -> int:
    """Lines that are neither blank nor comments."""
    return sum(1 for line in lines if line.strip() and not line.strip().startswith("#"))


def test_modules_stay_small():
    """No module of rlhf_kit/ past ~400 lines, and no recipe either (a piece belongs in the library)."""
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "rlhf_kit").rglob("*.py")) + sorted((root / "recipes").glob("*.py"))
    too_long = {str(f.relative_to(root)): n for f in files if (n := len(f.read_text().splitlines())) > 420}
    assert len(files) > 40 and not too_long, too_long


def test_ppo_main_reads_as_short_steps():
    """recipes/ppo.py's main: numbered steps, about 120 lines of code; set-up lives in rlhf_kit.ppo."""
    lines = (Path(__file__).resolve().parents[2] / "recipes" / "ppo.py").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("def main("))
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i][0].isspace())
    body = lines[start:end]
    steps = [int(m.group(1)) for line in body if (m := re.match(r"\s+# (\d+)\. ", line))]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 8, steps
    assert _code_lines(body) <= 120, _code_lines(body)
