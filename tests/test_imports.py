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
