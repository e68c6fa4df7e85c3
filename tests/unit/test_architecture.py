"""Architecture rules: mesh/ never imports sidecar/ or ca/; every module states its responsibility."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("mesh", "sidecar")


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_mesh_never_imports_sidecar_or_ca_at_module_level() -> None:
    offenders = []
    for path in modules("mesh"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only: the CLI may import lazily inside functions
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("sidecar", "ca")]
    assert offenders == []


def test_only_the_cli_imports_sidecar_lazily() -> None:
    lazy = [p.name for p in modules("mesh") if {"sidecar", "ca"} & imported_roots(p)]
    assert lazy in ([], ["cli.py"])


def test_sans_io_modules_do_not_import_trio() -> None:
    sans_io = ("http1.py", "pool.py", "balancer.py", "config.py", "spiffe.py", "outlier.py", "breaker.py")
    for name in (*sans_io, "retry.py", "deadline.py", "http2.py", "hpackcache.py", "admission.py", "errors.py"):
        assert "trio" not in imported_roots(ROOT / "mesh" / name), name


def test_every_module_has_a_one_line_docstring() -> None:
    missing = []
    for package in PACKAGES:
        for path in modules(package):
            doc = ast.get_docstring(ast.parse(path.read_text()))
            if not doc or not doc.splitlines()[0].strip():
                missing.append(str(path.relative_to(ROOT)))
    assert missing == []


def mesh_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every `from mesh.<module> import names` in a file, at any depth (lazy imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mesh.") and node.level == 0:
            found.append((node.module.removeprefix("mesh."), [alias.name for alias in node.names]))
    return found


def test_mesh_modules_take_only_public_names_from_each_other() -> None:
    """A module that another one needs offers it publicly; reaching for a private name hides a seam."""
    private = [
        f"{path.stem} takes {module}.{name}"
        for path in modules("mesh")
        for module, names in mesh_imports(path)
        for name in names
        if name.startswith("_")
    ]
    assert private == []


def test_mesh_modules_import_each_other_without_a_cycle() -> None:
    """Imports inside functions count: a lazy import only hides a cycle from the interpreter."""
    graph = {path.stem: {module for module, _ in mesh_imports(path)} for path in modules("mesh")}
    cycles = []

    def visit(module: str, trail: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in trail:
                cycles.append(" -> ".join([*trail[trail.index(target) :], target]))
            elif target not in seen:
                seen.add(target)
                visit(target, [*trail, target])

    for start in sorted(graph):
        seen = {start}
        visit(start, [start])
    assert cycles == []
