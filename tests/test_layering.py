"""The layering of docs/ARCHITECTURE.md, checked on the import statements of every module (function-level
imports included): an arrow that must never exist fails here, with the module and the import named."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> the omni_fast modules it must not import (prefix match); the kernels may import each other
# (omni_fast.kernels.*) and nothing else of the package
FORBIDDEN = {
    "omni_fast.kernels": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.grpo", "omni_fast.ops",
                          "omni_fast.config", "omni_fast.api", "omni_fast.eval", "omni_fast.cli", "omni_fast.native",
                          "omni_fast.distributed", "omni_fast.testing", "omni_fast.toy"),
    "omni_fast.model": ("omni_fast.engine", "omni_fast.grpo", "omni_fast.media", "omni_fast.api", "omni_fast.eval",
                        "omni_fast.cli", "omni_fast.kernels"),
    "omni_fast.media": ("omni_fast.model", "omni_fast.engine", "omni_fast.grpo", "omni_fast.api", "omni_fast.cli",
                        "omni_fast.kernels"),
    "omni_fast.engine": ("omni_fast.grpo", "omni_fast.media", "omni_fast.api", "omni_fast.cli", "omni_fast.kernels"),
    "omni_fast.grpo": ("omni_fast.api", "omni_fast.cli", "omni_fast.eval", "omni_fast.toy", "omni_fast.testing",
                       "omni_fast.kernels"),
    "omni_fast.config": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.api", "omni_fast.cli",
                         "omni_fast.kernels"),
    "omni_fast.api": ("omni_fast.grpo.trainer", "omni_fast.cli", "omni_fast.kernels"),
    "omni_fast.eval": ("omni_fast.cli", "omni_fast.kernels"),
}


def _modules():
    for path in sorted((ROOT / "omni_fast").rglob("*.py")):
        yield ".".join(path.relative_to(ROOT).with_suffix("").parts), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "omni_fast.kernels." + path.stem, path


def _imports(path: Path, module: str = ""):
    """Absolute names of what a module imports (relative imports resolved against its package)."""
    package = module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield base
            yield from (f"{base}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def test_no_forbidden_arrow():
    bad = []
    for module, path in _modules():
        rules = [banned for prefix, banned in FORBIDDEN.items() if module.startswith(prefix)]
        for name in set(_imports(path, module)):
            for banned in (b for rule in rules for b in rule):
                if name == banned or name.startswith(banned + "."):
                    bad.append(f"{module} imports {name}")
    assert not bad, bad


def test_argparse_only_in_the_cli_and_nothing_imports_the_cli():
    for module, path in _modules():
        names = set(_imports(path, module))
        if module != "omni_fast.cli":
            assert "argparse" not in names, module
            assert not any(n == "omni_fast.cli" or n.startswith("omni_fast.cli.") for n in names), module


def test_the_kernels_are_reached_through_ops_only():
    users = {module for module, path in _modules() if not module.startswith("omni_fast.kernels")
             and any(n.startswith("omni_fast.kernels") for n in _imports(path, module))}
    assert users <= {"omni_fast.ops"}, users


def test_the_checker_sees_relative_imports():
    import textwrap

    path = ROOT / "tests" / ".layering_probe.py"
    path.write_text(textwrap.dedent("""
        from . import ops
        from ..engine import engine
    """))
    try:
        names = set(_imports(path, "omni_fast.model.probe"))
    finally:
        path.unlink()
    assert {"omni_fast.model.ops", "omni_fast.engine.engine"} <= names
