"""The layering of docs/ARCHITECTURE.md, checked on the import statements of every module (function-level
imports included) and on the modules it names in strings ("omni_fast.kernels.rope:rope", what ops.py and the
package's lazy attributes import on first use): an arrow that must never exist fails here, with the module and
the import named, and so does any circle of imports."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module prefix -> the omni_fast modules it must not import (prefix match); the kernels may import each other
# (omni_fast.kernels.*) and nothing else of the package
FORBIDDEN = {
    "omni_fast.kernels": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.grpo", "omni_fast.ops",
                          "omni_fast.config", "omni_fast.api", "omni_fast.eval", "omni_fast.cli", "omni_fast.native",
                          "omni_fast.distributed", "omni_fast.testing", "omni_fast.toy", "omni_fast.features"),
    "omni_fast.model": ("omni_fast.engine", "omni_fast.grpo", "omni_fast.media", "omni_fast.api", "omni_fast.eval",
                        "omni_fast.cli", "omni_fast.kernels", "omni_fast.features"),
    "omni_fast.media": ("omni_fast.model", "omni_fast.engine", "omni_fast.grpo", "omni_fast.api", "omni_fast.cli",
                        "omni_fast.kernels", "omni_fast.features"),
    "omni_fast.engine": ("omni_fast.grpo", "omni_fast.media", "omni_fast.api", "omni_fast.cli", "omni_fast.kernels",
                         "omni_fast.features"),
    "omni_fast.grpo": ("omni_fast.api", "omni_fast.cli", "omni_fast.eval", "omni_fast.toy", "omni_fast.testing",
                       "omni_fast.kernels"),
    # the ground floor's leaves import nothing of the package: the task's words and parsers, atomic writes,
    # device and dtype resolution
    "omni_fast.task": ("omni_fast",),
    "omni_fast.atomic": ("omni_fast",),
    "omni_fast.devices": ("omni_fast",),
    "omni_fast.config": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.grpo", "omni_fast.api",
                         "omni_fast.eval", "omni_fast.cli", "omni_fast.kernels", "omni_fast.ops",
                         "omni_fast.features"),
    # the ground floor reaches nothing above it: ops.py only the kernels (by name) and omni_fast._C
    "omni_fast.ops": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.grpo", "omni_fast.api",
                      "omni_fast.eval", "omni_fast.cli", "omni_fast.config", "omni_fast.distributed",
                      "omni_fast.testing", "omni_fast.toy", "omni_fast.features"),
    # inference and evaluation never reach into training
    "omni_fast.api": ("omni_fast.grpo", "omni_fast.cli", "omni_fast.kernels", "omni_fast.serve"),
    "omni_fast.eval": ("omni_fast.grpo", "omni_fast.cli", "omni_fast.kernels", "omni_fast.serve"),
    "omni_fast.data": ("omni_fast.model", "omni_fast.engine", "omni_fast.media", "omni_fast.grpo", "omni_fast.api",
                       "omni_fast.eval", "omni_fast.cli", "omni_fast.kernels", "omni_fast.ops", "omni_fast.serve",
                       "omni_fast.features"),
    "omni_fast.features": ("omni_fast.engine", "omni_fast.grpo", "omni_fast.api", "omni_fast.eval", "omni_fast.cli",
                           "omni_fast.kernels", "omni_fast.testing", "omni_fast.toy", "omni_fast.serve"),
    # the server is a layer over OmniModel and its engine: nothing below it reaches up to it
    "omni_fast.serve": ("omni_fast.cli", "omni_fast.grpo", "omni_fast.eval", "omni_fast.kernels", "omni_fast.testing",
                        "omni_fast.toy"),
}
for _lower in ("omni_fast.kernels", "omni_fast.model", "omni_fast.media", "omni_fast.engine", "omni_fast.grpo",
               "omni_fast.config", "omni_fast.ops"):
    FORBIDDEN[_lower] += ("omni_fast.serve",)


def _modules():
    for path in sorted((ROOT / "omni_fast").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        yield "omni_fast.kernels." + path.stem, path


NAMED_MODULE = re.compile(r"^(omni_fast(?:\.\w+)+)(?::\w+)?$")  # "omni_fast.kernels.rope:rope", "omni_fast.api"


def _statements(path: Path, module: str = ""):
    """(module imported, [names imported from it] or None) for each import statement, relative ones resolved
    against the module's package, and (module, None) for each omni_fast module named in a string constant."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAMED_MODULE.match(node.value):
            yield NAMED_MODULE.match(node.value).group(1), None
        elif isinstance(node, ast.ImportFrom) and (node.module or node.level):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            yield base, [a.name for a in node.names]
        elif isinstance(node, ast.Import):
            yield from ((a.name, None) for a in node.names)


def _imports(path: Path, module: str = ""):
    """Absolute names of what a module imports, and the omni_fast modules it names in strings."""
    for base, names in _statements(path, module):
        yield base
        yield from (f"{base}.{n}" for n in names or ())


COMPILED = {"omni_fast._C"}  # the native extension (csrc/): it imports nothing of omni_fast


def _graph() -> dict[str, set[str]]:
    """module -> the omni_fast modules it imports. `from package import name` is an arrow to package.name when
    that is a module, else to the package (an attribute of it, such as a lazily imported one)."""
    known = {module for module, _ in _modules()} | COMPILED

    def owner(name: str) -> str | None:  # the module a dotted name lives in
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in known else None

    graph = {}
    for module, path in _modules():
        targets = set()
        for base, names in _statements(path, module):
            if not base.startswith("omni_fast"):
                continue
            targets |= {owner(f"{base}.{n}") if f"{base}.{n}" in known else owner(base) for n in names or [""]}
        graph[module] = targets - COMPILED - {None, module}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle():
    circles = _circles(_graph())
    assert not circles, circles


def test_the_circle_check_sees_a_circle_through_a_string_import():
    graph = {"omni_fast.ops": {"omni_fast.kernels.native"}, "omni_fast.kernels.native": {"omni_fast.ops"},
             "omni_fast.config": set()}
    assert _circles(graph) == [["omni_fast.kernels.native", "omni_fast.ops"]]
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


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
        IMPLS = {"torch": "omni_fast.kernels.rope:rope_ref", "lazy": "omni_fast.api"}
    """))
    try:
        names = set(_imports(path, "omni_fast.model.probe"))
    finally:
        path.unlink()
    assert {"omni_fast.model.ops", "omni_fast.engine.engine", "omni_fast.kernels.rope", "omni_fast.api"} <= names
