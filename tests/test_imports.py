"""The core never imports the optional frameworks; only tbdiag/integrations/ does."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "tbdiag"
OPTIONAL = {"transformers", "lightning", "pytorch_lightning", "peft", "accelerate", "timm", "torchvision"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


def test_core_does_not_import_optional_frameworks():
    offenders = {str(p.relative_to(PACKAGE)): imported_roots(p) & OPTIONAL for p in PACKAGE.rglob("*.py")
                 if "integrations" not in p.parts and imported_roots(p) & OPTIONAL}
    assert offenders == {}
    integrations = {p.name: imported_roots(p) & OPTIONAL for p in (PACKAGE / "integrations").glob("*.py")}
    assert integrations["hf.py"] == {"transformers"} and "lightning" in integrations["lightning.py"]


def module_graph() -> dict[str, set[str]]:
    """tbdiag module → the tbdiag modules it imports, anywhere in it (function-local imports included)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1], *([base] if base else [])])
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(u: str) -> None:
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                found.append(stack[stack.index(v):] + [v])
            elif v not in state:
                visit(v)
        stack.pop()
        state[u] = "done"

    for u in sorted(graph):
        if u not in state:
            visit(u)
    return found


def test_no_import_cycles_between_modules():
    graph = module_graph()
    assert {"tbdiag.pruning.files", "tbdiag.io.outputs", "tbdiag.io.tensors"} <= set(graph)
    assert "tbdiag.pruning.magnitude" in graph["tbdiag.pruning.files"] and "tbdiag.io.outputs" in graph["tbdiag.pruning.files"]
    assert cycles(graph) == []
    assert cycles({**graph, "tbdiag.io.tensors": graph["tbdiag.io.tensors"] | {"tbdiag.io.checkpoint"}})  # the check bites
