"""The layer order of docs/architecture.md ("Layers"), checked on the source: every import statement of
every vdit module, at module level or inside a function, names a module of its own layer or a lower one;
nothing above the ops imports the oracle; and the library imports without the demo."""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "vdit"

# Lowest layer first; a module belongs to the layer of the longest prefix listed here.
LAYERS = (
    ("kernels", ("vdit._C", "vdit._extension", "vdit._memory", "vdit._cache", "vdit.kernels")),
    ("backend names", ("vdit.backends",)),  # read by the registry, so below every op module
    ("ops", ("vdit.ops",)),
    ("modules", ("vdit.nn", "vdit.packing")),
    ("models & systems", ("vdit.models", "vdit.sampling", "vdit.training", "vdit.distributed", "vdit.swap",
                          "vdit")),
    ("demo & tools", ("vdit.demo", "vdit.bench")),
)

LIBRARY = ("vdit, vdit.ops, vdit.nn, vdit.models, vdit.sampling, vdit.training, vdit.packing, vdit.distributed, "
           "vdit.swap")


def layer_of(module: str) -> int:
    """Index in :data:`LAYERS` of ``module`` (dotted name), by its longest listed prefix."""
    best, index = "", None
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, index = prefix, i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it to LAYERS")
    return index


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether the dotted ``name`` is a module or package of the source tree (or the extension)."""
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists() or name == "vdit._C"


def imported_modules(tree: ast.AST, package: str):
    """(line, vdit module) of every import in ``tree``; ``from a import b`` names ``a.b`` when that is a
    module, else ``a``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base


def sources():
    return sorted(p for p in PACKAGE.rglob("*.py") if "assets" not in p.parts)


def upward_imports(path: pathlib.Path) -> list[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    own = layer_of(name)
    found = []
    for line, target in imported_modules(ast.parse(path.read_text(), str(path)), package):
        if target.split(".")[0] == "vdit" and layer_of(target) > own:
            found.append(f"{path.relative_to(ROOT)}:{line} ({LAYERS[own][0]}) imports {target} "
                         f"({LAYERS[layer_of(target)][0]})")
    return found


def test_every_module_has_a_layer():
    for path in sources():
        layer_of(module_name(path))


def test_imports_point_down():
    found = [line for path in sources() for line in upward_imports(path)]
    assert not found, "imports that point up:\n" + "\n".join(found)


def test_only_the_ops_import_the_oracle():
    """vdit.ops.reference is the tests' oracle and the ops' ``torch`` backend, not a utility library: code
    above the ops uses the helpers of vdit.ops._shared (or vdit.packing) instead."""
    above = [path for path in sources() if layer_of(module_name(path)) > layer_of("vdit.ops")]
    found = [f"{path.relative_to(ROOT)}:{line}" for path in above
             for line, target in imported_modules(ast.parse(path.read_text()), module_name(path))
             if target == "vdit.ops.reference"]
    assert not found, "imports of the oracle above the ops: " + ", ".join(found)


def test_the_check_sees_lazy_imports():
    """An import inside a function counts: the checker walks the whole tree, not only the module level."""
    tree = ast.parse("def f():\n    from vdit.demo import text\n    import vdit.swap\n")
    assert [m for _, m in imported_modules(tree, "vdit.ops")] == ["vdit.demo.text", "vdit.swap"]
    assert layer_of("vdit.demo.text") > layer_of("vdit.ops.rope") > layer_of("vdit.kernels.schemas")
    assert layer_of("vdit.packing") == layer_of("vdit.nn.rope")
    with pytest.raises(AssertionError, match="no layer"):
        layer_of("vdit_other.module")


def test_library_imports_without_the_demo():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (f"import sys, {LIBRARY}; "
            "demo = [m for m in sys.modules if m.startswith(('vdit.demo', 'vdit.bench'))]; assert not demo, demo")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
