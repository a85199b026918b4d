"""The library's shape, checked on its source: data flows one way, no private name crosses a module, and
package imports sit at the top of each module.

The checks read the code with :mod:`ast` (nothing is imported or run), so a change that breaks the layering
fails here with the file and line that does it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import detptq_mini

PKG = Path(detptq_mini.__file__).parent

# The data flow, earliest first. A module may import only modules that come before it. The first group is the
# method's chain (checks -> data -> model -> quant -> lp -> odol -> detptq -> adaround / qdrop -> reconstruction ->
# pipeline); the modules after `pipeline` sit beside it and use it, and nothing in the chain imports them, except
# that `checkpoint` (every checkpoint read and write) serves train, pipeline, export and the CLI.
ORDER = (
    "checks", "utils", "data", "model", "adapter", "quant", "lp", "evaluate", "odol", "detptq", "adaround", "qdrop",
    "reconstruction", "checkpoint", "pipeline", "train", "studies", "export", "deploy", "viz",
    "benchmark.suites", "benchmark.report", "benchmark.runner", "benchmark", "cli",
)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _target(node: ast.ImportFrom, module: str, path: Path) -> str | None:
    """The package module an ``from ... import`` statement reads (relative to the package), or None."""
    if node.level == 0:
        if node.module and (node.module == "detptq_mini" or node.module.startswith("detptq_mini.")):
            return node.module.removeprefix("detptq_mini").lstrip(".")
        return None
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
    return ".".join([*base, *([node.module] if node.module else [])]).strip(".")


def _package_imports(module: str, path: Path):
    """Every import of a package module: ``(target, names, node, inside_function)``."""
    tree = ast.parse(path.read_text(), str(path))
    funcs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nested = {id(sub) for f in funcs for sub in ast.walk(f) if sub is not f}
    # `if TYPE_CHECKING:` imports are for annotations only: no dependency at run time
    typing_only = {id(sub) for n in ast.walk(tree) if isinstance(n, ast.If) and isinstance(n.test, ast.Name)
                   and n.test.id == "TYPE_CHECKING" for sub in ast.walk(n)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            target = _target(node, module, path)
            if target is None:
                continue
            names = [a.name for a in node.names]
            if target in ("", module.rsplit(".", 1)[0] if "." in module else ""):
                # `from . import x` names modules, not members
                for n in names:
                    yield (f"{target}.{n}".strip("."), [], node, id(node) in nested)
                continue
            yield target, names, node, id(node) in nested
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("detptq_mini."):
                    yield a.name.removeprefix("detptq_mini."), [], node, id(node) in nested


def _rank(module: str) -> int:
    if module in ORDER:
        return ORDER.index(module)
    raise AssertionError(f"module {module!r} is not in tests/test_layout.py's ORDER: place it in the data flow")


@pytest.mark.parametrize("module", [m for m in MODULES if m])
def test_every_module_has_a_place_in_the_data_flow(module):
    _rank(module)


def test_no_module_imports_a_later_one():
    bad = []
    for module, path in MODULES.items():
        if not module:
            continue
        for target, _, node, _ in _package_imports(module, path):
            if target in MODULES and target != module and not target.startswith(module + ".") \
                    and _rank(target) > _rank(module):
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} {module} imports the later {target}")
    assert not bad, "\n".join(bad)


def _private_definitions() -> dict[str, set[str]]:
    """Per module, the private names it defines: module-level functions, classes and constants, methods, and
    attributes it assigns on ``self``."""
    out = {}
    for module, path in MODULES.items():
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        names.add(t.id)
                    elif isinstance(t, ast.Attribute):
                        names.add(t.attr)
        out[module] = {n for n in names if n.startswith("_") and not n.startswith("__")}
    return out


def test_no_private_name_crosses_a_module():
    """Imported (``from .x import _y``) or reached as an attribute (``thing._y`` where ``_y`` is private to
    another module of the package)."""
    private = _private_definitions()
    bad = []
    for module, path in MODULES.items():
        for target, names, node, _ in _package_imports(module, path):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and target != module:
                    bad.append(f"{path.relative_to(PKG)}:{node.lineno} imports {target}.{n}")
        own = private[module]
        others = set().union(*(v for k, v in private.items() if k != module)) - own
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in others:
                owner = node.value
                if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                    continue
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} reaches .{node.attr}, private to another module")
    assert not bad, "\n".join(bad)


def test_package_imports_are_at_the_top():
    """An import of a package module inside a function is allowed only to break an import cycle, and then the
    line says so (a comment with the word 'cycle')."""
    bad = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, _, node, inside in _package_imports(module, path):
            if inside and "cycle" not in lines[node.lineno - 1]:
                bad.append(f"{path.relative_to(PKG)}:{node.lineno} imports {target} inside a function")
    assert not bad, "\n".join(bad)


def test_nothing_cites_a_file_outside_the_repository():
    """The method is the book's own page (book/method.md); no docstring or page points outside the repository."""
    root = PKG.parent
    files = [*PKG.rglob("*.py"), *(root / "tests").glob("*.py"), *(root / "book").glob("*.md"),
             *(root / "notebooks").glob("*.ipynb"), *(root / "benchmarks").rglob("*.py"),
             *(root / "benchmarks").glob("*.md"), *(root / "tools").glob("*.py"), root / "README.md"]
    # the planning files of the project's authors, which readers do not have (spelled in parts, so that this test
    # does not name them itself)
    needles = (*(name + ".md" for name in ("METHOD", "DESIGN", "STYLE")), ".." + "/shared", "the Benchmarks issue")
    bad = [f"{f.relative_to(root)}: {n}" for f in files for n in needles
           if f != Path(__file__) and n in f.read_text()]
    assert not bad, "\n".join(bad)


def _table_modules(text: str, heading: str) -> list[str]:
    """The module names in the first column of the table after ``heading`` (backticked, `a`, `b` or `pkg/`)."""
    rows = text[text.index(heading):].split("\n\n| module |", 1)[1].split("\n\n", 1)[0].splitlines()
    names = []
    for row in rows[2:]:
        first = row.split("|")[1]
        names += [n.strip("/") for n in first.split("`")[1::2]]
    return names


@pytest.mark.parametrize("page, heading", [("README.md", "### The library, module by module"),
                                           ("book/method.md", "## Where each piece lives")])
def test_the_module_maps_match_the_code(page, heading):
    """README's module table and the method page's map name every module of the package, each once, in the
    data-flow order of ORDER."""
    text = (PKG.parent / page).read_text()
    listed = _table_modules(text, heading)
    top_level = [m for m in ORDER if "." not in m]
    assert listed == top_level, f"{page}: {listed} != {top_level}"
    assert set(top_level) == {m.split(".")[0] for m in MODULES if m}


#: Modules that book/api.md leaves out for now, each with the reason the page states for it.
API_PENDING: dict[str, str] = {}


def test_the_api_page_documents_every_module_in_order():
    """book/api.md has an ``automodule`` with ``:members:`` for every module, in the order of ORDER; each package
    (``detptq_mini``, ``benchmark``) comes first with its docstring only, since its members are re-exports."""
    text = (PKG.parent / "book" / "api.md").read_text()
    found = re.findall(r"^\.\. automodule:: detptq_mini(?:\.(\S+))?\n(   :members:\n)?", text, re.M)
    packages = {"", "benchmark"}
    modules = [m for m, _ in found if m not in packages]
    assert modules == [m for m in ORDER if m not in packages and m not in API_PENDING]
    assert all(bool(members) == (m not in packages) for m, members in found), found
    names = [m for m, _ in found]
    assert names[0] == "" and names.index("benchmark") < names.index("benchmark.suites")
    for module in API_PENDING:
        assert f"## `detptq_mini.{module}`\n\nNot on this page yet" in text, module
