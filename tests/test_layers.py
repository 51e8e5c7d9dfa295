"""The layer order of docs/DESIGN.md, enforced: a module imports only from its own layer and the layers above it.

Read with ``ast`` only (nothing is imported), so every import counts, including those inside functions.
"""
import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "edgequant"
#: top to bottom; each may import only from itself and the entries before it
LAYERS = ["errors", "core", "metrics", "solvers", "batches", "observers", "config", "io", "nn", "graph", "sim", "compress",
          "ptq", "qat", "export",
          "analysis", "models", "data", "cli"]


def _layer(parts: tuple[str, ...]) -> str:
    return parts[0].removesuffix(".py") if parts else ""


def _imports(source: str, rel: tuple[str, ...]):
    """``(line, imported edgequant layer)`` for every import in ``source``, the module at ``rel``
    (its path below edgequant/, e.g. ``("ptq", "cle.py")``)."""
    package = rel[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = tuple(base) + tuple((node.module or "").split(".")) if node.module else tuple(base)
                if not target or target == ("",):  # "from . import x" at the top of edgequant
                    target = tuple(a.name for a in node.names[:1])
            elif node.module and node.module.split(".")[0] == "edgequant":
                target = tuple(node.module.split(".")[1:])
            else:
                continue
            yield node.lineno, _layer(target) or _layer(tuple(a.name for a in node.names[:1]))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "edgequant":
                    yield node.lineno, _layer(tuple(a.name.split(".")[1:]))


def test_every_module_is_in_a_layer():
    found = {p.relative_to(ROOT).parts[0].removesuffix(".py") for p in ROOT.iterdir()
             if p.name != "__init__.py" and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert found == set(LAYERS), f"add new packages to LAYERS (and docs/DESIGN.md): {sorted(found ^ set(LAYERS))}"


@pytest.mark.parametrize("path", sorted(p for p in ROOT.rglob("*.py") if p != ROOT / "__init__.py"),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_layer_order(path):
    own = _layer(path.relative_to(ROOT).parts)
    bad = [f"line {line}: {own} imports {target}" for line, target in _imports(path.read_text(), path.relative_to(ROOT).parts)
           if target in LAYERS and LAYERS.index(target) > LAYERS.index(own)]
    assert not bad, "import against the layer order of docs/DESIGN.md: " + "; ".join(bad)


def test_the_checker_sees_a_violation():
    """The walk above must be able to fail: upward imports, in a function body too, are found."""
    src = "import edgequant.ptq\ndef f():\n    from ..export.onnx_qdq import export_onnx\n    from .prepare import x\n"
    found = [t for _, t in _imports(src, ("sim", "quantsim.py"))]
    assert found == ["ptq", "export", "sim"]


def test_no_function_is_longer_than_80_lines():
    """Long functions hide their seams (the pipeline was 172 lines, prepare_graph 163): split them."""
    long = []
    for p in sorted(ROOT.rglob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 80:
                long.append(f"{p.relative_to(ROOT)}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)")
    assert not long, "split these along their seams: " + "; ".join(long)
