"""The layering of docs/architecture.md, read from the source: imports run one way, from the
applications down, and no module or function grows past what a reader can hold."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "gstalk"
# lower number = lower layer; a package may import only from layers below its own
LAYERS = {
    "": 0, "errors": 0, "config": 1,
    "io": 2, "face": 2, "kernels": 2,
    "gaussians": 3, "render": 3, "deform": 3, "head": 3, "audio": 3,
    "avatar": 4,
    "prepare": 5, "train": 5, "drive": 5, "eval": 5, "export": 5, "viewer": 5,
    "demo": 6, "fit": 6, "batch": 7, "cli": 8, "__main__": 9,
}
# within the model layer, what one package may take from another (and the reverse never)
SAME_LAYER = {("render", "gaussians")}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 600, 120


def _modules():
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT).with_suffix("")
        yield p, rel.parts[0] if len(rel.parts) > 1 else rel.name if rel.name != "__init__" else ""


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "gstalk":
            yield node.module, node.lineno
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "gstalk":
                    yield a.name, node.lineno


def test_every_package_has_a_layer():
    assert {pkg for _, pkg in _modules()} <= set(LAYERS), {pkg for _, pkg in _modules()} - set(LAYERS)


def test_imports_run_one_way():
    """Every import, function-local ones included: to a lower layer, or within its package;
    render and deform (and the other model packages) do not import each other, render never
    imports avatar, and no application imports another."""
    wrong = []
    for path, pkg in _modules():
        for module, line in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            if target == pkg or (pkg, target) in SAME_LAYER:
                continue
            if LAYERS[target] >= LAYERS[pkg]:
                wrong.append(f"{path.relative_to(ROOT.parent)}:{line} ({pkg}, layer {LAYERS[pkg]}) imports {module} "
                             f"(layer {LAYERS[target]})")
    assert not wrong, "\n".join(wrong)


def test_the_check_finds_an_upward_import(tmp_path, monkeypatch):
    """The rule above fails where it should: a render module that imports deform, or avatar."""
    bad = tmp_path / "gstalk" / "render"
    bad.mkdir(parents=True)
    (bad / "x.py").write_text("def f():\n    from gstalk.deform.hashgrid import HashGrid\n    import gstalk.avatar.model\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "gstalk")
    with pytest.raises(AssertionError, match="imports gstalk.deform.hashgrid.*\n.*imports gstalk.avatar.model"):
        test_imports_run_one_way()


def test_no_file_or_function_too_long_to_read():
    long = []
    for path, _ in _modules():
        src = path.read_text()
        if src.count("\n") > MAX_FILE_LINES:
            long.append(f"{path.relative_to(ROOT.parent)}: {src.count(chr(10))} lines")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {node.name}: {n} lines")
    assert not long, "\n".join(long)
