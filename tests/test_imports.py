"""Dependencies point one way: cli -> server -> rotation -> service -> auth / vault /
store -> errors / config, and the daemon -> the client's wire errors. Nothing
imports server; the client imports nothing but the standard library and
itself. The graph of both packages has no cycle."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kmsd": ROOT / "kmsd", "kmsd_client": ROOT / "client" / "kmsd_client"}

# module -> the modules of kmsd and kmsd_client it may import
ALLOWED = {
    "kmsd.errors": {"kmsd_client.errors"},
    "kmsd.settings_fields": {"kmsd.errors"},
    "kmsd.config": {"kmsd.errors", "kmsd.settings_fields"},
    "kmsd.envelope": set(),
    "kmsd.logs": set(),
    "kmsd.store": {"kmsd.errors"},
    "kmsd.store_sql": {"kmsd.store"},
    "kmsd.store_sqlite": {"kmsd.errors", "kmsd.store", "kmsd.store_sql"},
    "kmsd.mysql_batch": {"kmsd.errors"},
    "kmsd.mysql_schema": {"kmsd.store_sql"},
    "kmsd.mysql_nodes": {"kmsd.config"},
    "kmsd.store_mysql": {"kmsd.errors", "kmsd.config", "kmsd.store", "kmsd.store_sql", "kmsd.mysql_batch",
                         "kmsd.mysql_schema", "kmsd.mysql_nodes"},
    "kmsd.runtime": {"kmsd.auth", "kmsd.config", "kmsd.rotation", "kmsd.service", "kmsd.store", "kmsd.store_mysql",
                     "kmsd.store_sqlite", "kmsd.vault"},
    "kmsd.auth": {"kmsd.errors"},
    "kmsd.privileges": set(),
    "kmsd.launcher": {"kmsd.privileges"},
    "kmsd.vault_protocol": set(),
    "kmsd.vault": {"kmsd.errors", "kmsd.config", "kmsd.launcher", "kmsd.vault_protocol"},
    "kmsd.vault_process": {"kmsd.envelope", "kmsd.privileges", "kmsd.vault_protocol"},
    "kmsd.keyring": {"kmsd.errors", "kmsd.envelope", "kmsd.auth", "kmsd.store", "kmsd.vault"},
    "kmsd.service": {"kmsd.errors", "kmsd.envelope", "kmsd.auth", "kmsd.keyring", "kmsd.store", "kmsd.vault",
                     "kmsd.vault_protocol"},
    "kmsd.migrate": {"kmsd.errors", "kmsd.service", "kmsd.store"},
    "kmsd.rotation": {"kmsd.errors", "kmsd.logs", "kmsd.service", "kmsd.store"},
    "kmsd.rootkey": {"kmsd.errors", "kmsd.config", "kmsd.envelope", "kmsd.runtime"},
    "kmsd.admin": {"kmsd_client.__init__", "kmsd.errors", "kmsd.config", "kmsd.logs", "kmsd.rootkey", "kmsd.rotation",
                   "kmsd.runtime", "kmsd.service",
                   "kmsd.store"},
    "kmsd.systemd": set(),
    "kmsd.metrics": {"kmsd.errors"},
    "kmsd.audit": {"kmsd.errors", "kmsd.logs"},
    "kmsd.connections": {"kmsd.errors"},
    "kmsd.limits": set(),
    "kmsd.http_state": {"kmsd.audit", "kmsd.auth", "kmsd.config", "kmsd.connections", "kmsd.errors", "kmsd.limits",
                        "kmsd.metrics", "kmsd.rotation", "kmsd.runtime", "kmsd.service", "kmsd.store", "kmsd.vault"},
    "kmsd.http_input": {"kmsd.auth", "kmsd.errors", "kmsd.http_state", "kmsd.limits"},
    "kmsd.middleware": {"kmsd.audit", "kmsd.auth", "kmsd.errors", "kmsd.http_state", "kmsd.limits", "kmsd.logs"},
    "kmsd.http_envelope": {"kmsd.envelope", "kmsd.errors", "kmsd.http_input", "kmsd.http_state", "kmsd.service",
                           "kmsd.vault", "kmsd.vault_protocol"},
    "kmsd.server": {"kmsd.audit", "kmsd.auth", "kmsd.config", "kmsd.errors", "kmsd.http_envelope", "kmsd.http_input",
                    "kmsd.http_state", "kmsd.limits", "kmsd.logs", "kmsd.metrics", "kmsd.middleware", "kmsd.runtime",
                    "kmsd.service"},
    "kmsd.daemon": {"kmsd.auth", "kmsd.config", "kmsd.connections", "kmsd.errors", "kmsd.http_state", "kmsd.limits",
                    "kmsd.logs", "kmsd.privileges", "kmsd.server", "kmsd.systemd"},
    "kmsd.cli": {"kmsd.runtime", "kmsd.admin", "kmsd.audit", "kmsd.errors", "kmsd.config", "kmsd.logs", "kmsd.migrate", "kmsd.daemon", "kmsd.service", "kmsd.vault"},
    "kmsd.__main__": {"kmsd.cli"},
    "kmsd.__init__": set(),

    "kmsd_client.errors": set(),
    "kmsd_client._protocol": {"kmsd_client.errors"},
    "kmsd_client._http11": {"kmsd_client._protocol"},
    "kmsd_client.aio": {"kmsd_client._http11", "kmsd_client._protocol", "kmsd_client.errors"},
    "kmsd_client.__init__": {"kmsd_client._protocol", "kmsd_client.aio", "kmsd_client.errors"},
    "kmsd_client.envelope": {"kmsd_client.__init__"},
    "kmsd_client.__main__": {"kmsd_client.__init__", "kmsd_client.envelope"},
}


def module_imports(path: Path, package: str) -> tuple[set[str], set[str]]:
    """The modules of kmsd and kmsd_client that ``path`` imports, and the
    top-level names of everything else it imports."""
    ours: set[str] = set()
    others: set[str] = set()

    def add(name: str) -> None:
        top, _, rest = name.partition(".")
        if top in PACKAGES:
            ours.add(f"{top}.{rest.split('.')[0]}" if rest else f"{top}.__init__")
        else:
            others.add(top)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1:
                if node.module:
                    add(f"{package}.{node.module}")
                else:
                    ours.update(f"{package}.{a.name}" for a in node.names)
            elif node.module:
                if node.module in PACKAGES:
                    ours.update(f"{node.module}.{a.name}" for a in node.names
                                if (PACKAGES[node.module] / f"{a.name}.py").exists())
                    if not all((PACKAGES[node.module] / f"{a.name}.py").exists() for a in node.names):
                        ours.add(f"{node.module}.__init__")
                else:
                    add(node.module)
        elif isinstance(node, ast.Import):
            for a in node.names:
                add(a.name)
    return ours, others


def graph() -> dict[str, set[str]]:
    found = {}
    for package, directory in PACKAGES.items():
        for path in sorted(directory.glob("*.py")):
            found[f"{package}.{path.stem}"] = module_imports(path, package)[0]
    return found


def test_dependencies_point_one_way() -> None:
    for name, imports in graph().items():
        assert name in ALLOWED, f"new module {name}: add it to the dependency table"
        extra = imports - ALLOWED[name]
        assert not extra, f"{name} imports {extra}"


def test_no_import_cycle() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "import cycle: " + " -> ".join([*path[path.index(name):], name])
        if name in done:
            return
        for dep in sorted(edges.get(name, ())):
            visit(dep, [*path, name])
        done.add(name)

    for name in edges:
        visit(name, [])


def test_the_table_itself_has_no_cycle() -> None:
    # The table is what a change is checked against: a cycle allowed in it
    # would be a cycle waiting to happen.
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, "cycle in ALLOWED: " + " -> ".join([*path[path.index(name):], name])
        if name not in done:
            for dep in sorted(ALLOWED.get(name, ())):
                visit(dep, [*path, name])
            done.add(name)

    for name in ALLOWED:
        visit(name, [])


# The client's optional extras: module -> what it may import beyond the
# standard library (only inside functions, so that importing it needs nothing).
EXTRAS = {"envelope.py": {"cryptography"}}


def test_client_imports_only_the_standard_library() -> None:
    for path in sorted(PACKAGES["kmsd_client"].rglob("*.py")):
        ours, others = module_imports(path, "kmsd_client")
        assert all(name.startswith("kmsd_client.") for name in ours), path
        outside = {name for name in others if name not in sys.stdlib_module_names and name != "__future__"}
        assert outside <= EXTRAS.get(path.name, set()), f"{path} imports {outside}"
    # The extra is imported lazily: the module itself loads without it.
    tree = ast.parse((PACKAGES["kmsd_client"] / "envelope.py").read_text())
    top = {a.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for a in node.names}
    top |= {(node.module or "").split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom)}
    assert "cryptography" not in top
