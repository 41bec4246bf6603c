"""The package's imports point one way: down the layers below, never round (read with ast, nothing imported)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "irmprobe"

LAYERS = (
    ("irmprobe.cache", "irmprobe.results", "irmprobe.config", "irmprobe.llm", "irmprobe.devices", "irmprobe.prompts",
     "irmprobe.progress"),
    ("irmprobe.models",),
    ("irmprobe.activations",),
    ("irmprobe.organisms",),
    ("irmprobe.saes",),
    ("irmprobe.irm",),
    ("irmprobe.analysis",),
    ("irmprobe.validation",),
    ("irmprobe.reporting",),
    ("irmprobe.pipeline",),
    ("irmprobe", "irmprobe.api", "irmprobe.cli", "irmprobe.parallel", "irmprobe.console"),
)
"""Bottom to top. A module may import its own layer (without a cycle) and the layers below it, never above."""

DOMAIN = ("models", "activations", "organisms", "saes", "irm", "analysis", "validation")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """The irmprobe modules ``path`` imports, at any depth of the file (in functions too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("irmprobe"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("irmprobe")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; irmprobe imports by absolute name")
    return out


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            exact = prefix == "irmprobe"
            if (module == prefix) if exact else (module == prefix or module.startswith(prefix + ".")):
                if len(prefix) > best:
                    best, rank = len(prefix), i
    if rank is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    mods = modules(root)
    return {m: {d for d in imports(p, set(mods)) if d != m} for m, p in mods.items()}


def problems(edges: dict[str, set[str]]) -> list[str]:
    found = []
    for module, deps in sorted(edges.items()):
        for dep in sorted(deps):
            if dep not in edges:
                found.append(f"{module} imports {dep}, which does not exist")
            elif layer_of(dep) > layer_of(module):
                found.append(f"{module} imports {dep}, a layer above it")
            top = module.split(".")[1] if module.count(".") else ""
            if top in DOMAIN and dep.split(".")[1:2] and dep.split(".")[1] in ("pipeline", "reporting", "cli", "api"):
                found.append(f"domain package {top} imports {dep}")
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(u: str) -> None:
        state[u] = 1
        stack.append(u)
        for v in sorted(edges.get(u, ())):
            if v not in edges:
                continue
            if state.get(v) == 1:
                found.append("cycle: " + " -> ".join(stack[stack.index(v):] + [v]))
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def late_imports(root: Path = PACKAGE) -> list[str]:
    """Module-level imports that come after a definition (an import at the bottom hides a cycle)."""
    found = []
    for name, path in modules(root).items():
        seen_def = False
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                seen_def = True
            elif isinstance(node, (ast.Import, ast.ImportFrom)) and seen_def:
                found.append(f"{name}:{node.lineno}")
    return found


def test_imports_point_down_the_layers_and_never_round():
    assert problems(graph()) == []


def test_no_module_imports_after_its_definitions():
    assert late_imports() == []


def test_every_stage_module_is_in_the_graph_and_the_graph_has_its_own_module():
    from irmprobe.pipeline.graph import GRAPH

    stage_modules = {m for m in modules() if m.startswith("irmprobe.pipeline.stages.")}
    assert {type(s).__module__ for s in GRAPH} == stage_modules


@pytest.mark.parametrize("bad, expected", [
    ({"saes/train.py": "from irmprobe.pipeline.graph import GRAPH\n"}, "a layer above it"),
    ({"models/loading.py": "from irmprobe.activations.capture import Capture\n"}, "a layer above it"),
    ({"irm/crossfit.py": "from irmprobe.reporting.summary import plain\n"}, "domain package irm imports"),
    ({"a/one.py": "from irmprobe.a.two import x\n", "a/two.py": "from irmprobe.a.one import y\n"}, "cycle:"),
])
def test_the_checks_catch_an_arrow_up_a_domain_import_and_a_cycle(tmp_path, bad, expected, monkeypatch):
    """A planted package whose only fault is the one given: the check names it."""
    root = tmp_path / "irmprobe"
    files = {"models/loading.py": "", "activations/capture.py": "", "saes/train.py": "", "irm/crossfit.py": "",
             "reporting/summary.py": "", "pipeline/graph.py": "", "a/one.py": "", "a/two.py": "", **bad}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
        (root / rel).parent.joinpath("__init__.py").touch()
    monkeypatch.setattr(__import__(__name__, fromlist=["LAYERS"]), "LAYERS", LAYERS + (("irmprobe.a",),))
    found = problems(graph(root))
    assert any(expected in f for f in found), found


def test_a_late_import_is_caught(tmp_path):
    root = tmp_path / "irmprobe"
    root.mkdir()
    (root / "__init__.py").touch()
    (root / "m.py").write_text("def f():\n    pass\n\n\nfrom irmprobe import n  # noqa: E402\n")
    assert late_imports(root) == ["irmprobe.m:5"]
