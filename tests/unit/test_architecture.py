"""Architecture rules: import boundaries between mesh/, sidecar/ and ca/, followed transitively; sans-io stays off trio;
no import cycles; every module states its responsibility."""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
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


# --- the import graph, followed transitively ---------------------------------------------------------------------

GRAPH_PACKAGES = ("mesh", "sidecar", "ca")
SANS_IO = (
    "http1",
    "pool",
    "balancer",
    "config",
    "spiffe",
    "outlier",
    "breaker",
    "retry",
    "deadline",
    "http2",
    "hpackcache",
    "admission",
    "errors",
    "reload",
    "pipeline.router",
    "pipeline.pathnorm",
)
"""Modules of mesh/ that must be importable without trio (those that do not exist yet are skipped)."""


@dataclass(frozen=True)
class Import:
    """One module's dependency on another, as one import statement makes it."""

    target: str  # a module of the graph's packages, or the top-level name of any other (e.g. "trio")
    line: int
    lazy: bool  # inside a function or method body: runs when that is called, not when the module is imported
    typing_only: bool  # under `if TYPE_CHECKING:`: never runs
    implied: bool  # a parent package of the named module, initialised before it


Graph = dict[str, list[Import]]


def module_files(root: Path, packages: tuple[str, ...] = GRAPH_PACKAGES) -> dict[str, Path]:
    """{dotted module name: file} of every module under `packages` (subpackages included)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(root: Path, packages: tuple[str, ...] = GRAPH_PACKAGES) -> Graph:
    """Every import of every module under `packages`, module-level and lazy, resolved to modules.

    `import a.b.c` depends on a, a.b (implied) and a.b.c; `from a.b import n` on a (implied), a.b, and a.b.n when
    that is a module; relative imports are resolved against the importing module's package. A module also depends
    on its own parent packages (implied): importing it initialises them first. Imports of anything outside
    `packages` are recorded by their top-level name."""
    files = module_files(root, packages)
    return {module: _imports(module, path, files, packages) for module, path in files.items()}


def _imports(module: str, path: Path, files: dict[str, Path], packages: tuple[str, ...]) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges = [Import(parent, 0, False, False, True) for parent in _parents(module) if parent in files]

    def resolve(name: str) -> list[tuple[str, bool]]:
        """(module, implied) pairs that importing `name` depends on."""
        if name.split(".")[0] not in packages:
            return [(name.split(".")[0], False)]
        named = [(name, False)] if name in files else []
        return [(parent, True) for parent in _parents(name) if parent in files] + named

    def visit(node: ast.AST, lazy: bool, typing_only: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                edges.extend(Import(t, node.lineno, lazy, typing_only, implied) for t, implied in resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = resolve(base)
            targets += [(f"{base}.{alias.name}", False) for alias in node.names if f"{base}.{alias.name}" in files]
            edges.extend(Import(t, node.lineno, lazy, typing_only, implied) for t, implied in targets)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, lazy, True)
            for child in node.orelse:
                visit(child, lazy, typing_only)
        else:
            inner = lazy or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            for child in ast.iter_child_nodes(node):
                visit(child, inner, typing_only)

    visit(ast.parse(path.read_text()), False, False)
    return edges


Follow = Callable[[str, Import], bool]


def at_import_time(source: str, edge: Import) -> bool:
    """The imports that run when a module is imported: module level, not under TYPE_CHECKING."""
    return not edge.lazy and not edge.typing_only


def at_run_time(source: str, edge: Import) -> bool:
    """Every import that can run: module level and lazy, not under TYPE_CHECKING."""
    return not edge.typing_only


def chains(graph: Graph, start: str, follow: Follow, forbidden: Callable[[str], bool]) -> list[str]:
    """The shortest import chain from `start` into each forbidden package it reaches, not looking past a forbidden
    module, e.g. "mesh.retry -> mesh.errors -> trio"; of equally short ones, the one naming the deepest module."""
    trail = {start: [start]}
    queue = deque([start])
    found: dict[str, list[str]] = {}
    while queue:
        module = queue.popleft()
        for edge in graph.get(module, ()):
            if edge.target in trail or not follow(module, edge):
                continue
            chain = trail[edge.target] = [*trail[module], edge.target]
            if not forbidden(edge.target):
                queue.append(edge.target)
                continue
            package = edge.target.split(".")[0]
            best = found.get(package)
            if best is None or (len(chain), -len(chain[-1])) < (len(best), -len(best[-1])):
                found[package] = chain
    return [" -> ".join(chain) for _, chain in sorted(found.items())]


def _in(*packages: str) -> Callable[[str], bool]:
    return lambda module: module.split(".")[0] in packages


def _says_sans_io(path: Path) -> bool:
    """A module whose docstring's first line calls it sans-io: "Sans-io HTTP/1.1 codec: ..." or "... (sans-io): ..."."""
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    first = doc.split("\n", 1)[0].lower()
    return first.startswith("sans-io") or "(sans-io)" in first


def sans_io_modules(root: Path) -> list[str]:
    files = module_files(root, ("mesh",))
    named = {f"mesh.{name}" for name in SANS_IO} & files.keys()
    return sorted(named | {module for module, path in files.items() if _says_sans_io(path)})


def sans_io_violations(root: Path) -> list[str]:
    """Chains from a sans-io module to trio, through module-level imports only: a lazy import inside a function is
    not reached when the module is imported (it is the caller's business), and one under TYPE_CHECKING never runs."""
    graph = import_graph(root)
    return [c for m in sans_io_modules(root) for c in chains(graph, m, at_import_time, lambda t: t == "trio")]


def mesh_import_time_violations(root: Path) -> list[str]:
    """Chains from any module of mesh/ to sidecar/ or ca/ through module-level imports."""
    graph = import_graph(root)
    mesh = [module for module in graph if _in("mesh")(module)]
    return [c for m in mesh for c in chains(graph, m, at_import_time, _in("sidecar", "ca"))]


def _not_the_cli_lazily(source: str, edge: Import) -> bool:
    """Runtime imports, except the CLI's lazy ones of sidecar/ and ca/: the one way mesh/ may reach them."""
    exempt = source == "mesh.cli" and edge.lazy and _in("sidecar", "ca")(edge.target)
    return at_run_time(source, edge) and not exempt


def mesh_run_time_violations(root: Path) -> list[str]:
    """Chains from any module of mesh/ to sidecar/ or ca/ through module-level and lazy imports, other than the
    CLI's lazy imports of them."""
    graph = import_graph(root)
    mesh = [module for module in graph if _in("mesh")(module)]
    return [c for m in mesh for c in chains(graph, m, _not_the_cli_lazily, _in("sidecar", "ca"))]


def sidecar_violations(root: Path) -> list[str]:
    """Chains from any module of sidecar/ but the demo to ca/, through module-level and lazy imports (a chain through
    the demo counts: only the demo itself may use the CA)."""
    graph = import_graph(root)
    starts = [module for module in graph if _in("sidecar")(module) and module != "sidecar.demo"]
    return [c for m in starts for c in chains(graph, m, at_run_time, _in("ca"))]


def _shortest_cycle(graph: Graph, start: str, follow: Follow) -> list[str] | None:
    trail = {start: [start]}
    queue = deque([start])
    while queue:
        module = queue.popleft()
        for edge in graph.get(module, ()):
            if not follow(module, edge):
                continue
            if edge.target == start:
                return [*trail[module], start]
            if edge.target not in trail:
                trail[edge.target] = [*trail[module], edge.target]
                queue.append(edge.target)
    return None


def mesh_import_cycles(root: Path) -> list[str]:
    """Import cycles among mesh/ modules through explicit module-level imports, each reported once from its first
    module in name order (a package that imports its own submodules makes no cycle: it is initialised first)."""
    graph = import_graph(root)

    def follow(source: str, edge: Import) -> bool:
        return at_import_time(source, edge) and not edge.implied and _in("mesh")(edge.target)

    cycles: list[str] = []
    covered: set[str] = set()
    for start in sorted(module for module in graph if _in("mesh")(module)):
        cycle = None if start in covered else _shortest_cycle(graph, start, follow)
        if cycle:
            cycles.append(" -> ".join(cycle))
            covered.update(cycle)
    return cycles


def test_sans_io_modules_reach_no_trio_through_module_level_imports() -> None:
    """A lazy import inside a function is not reached when the module is imported, so it is not followed here."""
    assert sans_io_violations(ROOT) == []


def test_mesh_reaches_neither_sidecar_nor_ca_through_module_level_imports() -> None:
    assert mesh_import_time_violations(ROOT) == []


def test_mesh_reaches_sidecar_and_ca_only_through_the_cli_lazily() -> None:
    assert mesh_run_time_violations(ROOT) == []


def test_sidecar_reaches_ca_only_from_the_demo() -> None:
    assert sidecar_violations(ROOT) == []


def test_mesh_modules_import_each_other_at_module_level_without_a_cycle() -> None:
    assert mesh_import_cycles(ROOT) == []


# --- the checkers catch what they are for: fake trees in a temporary directory -----------------------------------


def write_tree(root: Path, files: dict[str, str]) -> Path:
    """Write `files` ({relative path: source}) under `root`, with an __init__.py in every package that has none.
    A source without a docstring gets one."""
    for relative, source in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source if source.startswith('"""') else f'"""A fake module."""\n{source}')
    for relative in list(files):
        for parent in Path(relative).parents:
            if parent != Path(".") and not (root / parent / "__init__.py").exists():
                (root / parent / "__init__.py").write_text('"""A fake package."""\n')
    return root


def test_the_graph_resolves_absolute_relative_and_submodule_imports(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "mesh/http1.py": "",
            "mesh/errors.py": "",
            "mesh/x.py": "Name = 1\n",
            "mesh/pipeline/router.py": "from .. import errors\nfrom ..x import Name\nfrom . import pathnorm\n",
            "mesh/pipeline/pathnorm.py": "",
            "mesh/user.py": (
                "from mesh import http1\nfrom mesh.x import Name\nfrom mesh.pipeline import router\n"
                "import mesh.pipeline.pathnorm\n\ndef later():\n    import trio.lowlevel\n"
            ),
        },
    )
    graph = import_graph(root)
    targets = {module: {(e.target, e.lazy, e.implied) for e in edges} for module, edges in graph.items()}
    assert targets["mesh.user"] == {
        ("mesh", False, False),
        ("mesh", False, True),
        ("mesh.http1", False, False),
        ("mesh.x", False, False),
        ("mesh.pipeline", False, False),
        ("mesh.pipeline", False, True),
        ("mesh.pipeline.router", False, False),
        ("mesh.pipeline.pathnorm", False, False),
        ("trio", True, False),
    }
    assert {t for t, _, implied in targets["mesh.pipeline.router"] if not implied} == {
        "mesh",
        "mesh.errors",
        "mesh.x",
        "mesh.pipeline",
        "mesh.pipeline.pathnorm",
    }


def test_a_sans_io_module_reaching_trio_is_reported_with_its_chain(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "mesh/retry.py": "from mesh.errors import MeshError\n",
            "mesh/errors.py": "from mesh import helper\n",
            "mesh/helper.py": "import trio\n",
            "mesh/breaker.py": "def later():\n    import trio\n",  # lazy: not reached at import time
            "mesh/balancer.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import trio\n",
            "mesh/pipeline/faults.py": '"""Fault injection (sans-io): delays and aborts."""\nfrom ..helper import x\n',
        },
    )
    assert sans_io_violations(root) == [
        "mesh.errors -> mesh.helper -> trio",
        "mesh.pipeline.faults -> mesh.helper -> trio",
        "mesh.retry -> mesh.errors -> mesh.helper -> trio",
    ]


def test_mesh_reaching_sidecar_or_ca_is_reported_with_its_chain(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "mesh/proxy.py": "from mesh.helper import x\n",
            "mesh/helper.py": "from sidecar.app import run\n",
            "mesh/cli.py": "def main():\n    from sidecar import app\n    from ca import commands\n",
            "mesh/identity.py": "def issue():\n    import ca.authority\n",
            "sidecar/app.py": "",
            "ca/commands.py": "",
            "ca/authority.py": "",
        },
    )
    assert mesh_import_time_violations(root) == [
        "mesh.helper -> sidecar.app",
        "mesh.proxy -> mesh.helper -> sidecar.app",
    ]
    assert mesh_run_time_violations(root) == [
        "mesh.helper -> sidecar.app",
        "mesh.identity -> ca.authority",
        "mesh.proxy -> mesh.helper -> sidecar.app",
    ]


def test_sidecar_reaching_ca_is_reported_with_its_chain_except_from_the_demo(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "sidecar/app.py": "def serve():\n    from sidecar.certs import issue\n",
            "sidecar/certs.py": "from ca.authority import CertificateAuthority\n",
            "sidecar/demo.py": "from ca.authority import CertificateAuthority\n",
            "ca/authority.py": "",
        },
    )
    assert sidecar_violations(root) == [
        "sidecar.app -> sidecar.certs -> ca.authority",
        "sidecar.certs -> ca.authority",
    ]


def test_a_module_level_import_cycle_is_reported(tmp_path: Path) -> None:
    root = write_tree(
        tmp_path,
        {
            "mesh/a.py": "from mesh import b\n",
            "mesh/b.py": "from .c import x\n",
            "mesh/c.py": "import mesh.a\n",
            "mesh/d.py": "from mesh import a\n",  # imports the cycle, is not part of it
            "mesh/lazy.py": "def later():\n    from mesh import late\n",
            "mesh/late.py": "from mesh import lazy\n",  # a cycle only through a lazy import: not at import time
            "mesh/pipeline/__init__.py": '"""A package."""\nfrom mesh.pipeline.router import route\n',
            "mesh/pipeline/router.py": "",  # depends on its package, which imports it: no cycle
        },
    )
    assert mesh_import_cycles(root) == ["mesh.a -> mesh.b -> mesh.c -> mesh.a"]
