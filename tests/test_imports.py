"""Dependencies point one way: cli -> server -> rotation -> service -> auth / vault /
store -> errors / config. Nothing imports server; the client imports only
the shared errors."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# module -> the kmsd modules it may import
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "envelope": set(),
    "logs": set(),
    "store": {"errors", "config", "store_mysql"},
    "store_mysql": {"errors", "config", "store"},
    "auth": {"errors"},
    "privileges": set(),
    "launcher": {"privileges"},
    "vault_protocol": set(),
    "vault": {"errors", "config", "launcher", "vault_protocol"},
    "vault_process": {"envelope", "privileges", "vault_protocol"},
    "service": {"errors", "config", "envelope", "auth", "store", "vault", "vault_protocol"},
    "migrate": {"errors", "service", "store"},
    "rotation": {"errors", "logs", "service", "store"},
    "rootkey": {"errors", "config", "envelope", "service", "store"},
    "admin": {"errors", "config", "logs", "rotation", "rootkey", "service"},
    "systemd": set(),
    "metrics": {"errors"},
    "audit": {"errors", "logs"},
    "connections": {"errors"},
    "limits": set(),
    "server": {"errors", "config", "audit", "auth", "connections", "limits", "logs", "metrics", "privileges", "rotation",
               "service", "store", "systemd", "vault", "vault_protocol"},
    "cli": {"admin", "audit", "errors", "config", "logs", "migrate", "server", "service", "vault"},
    "__main__": {"cli"},
    "__init__": set(),
}


def kmsd_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level >= 1:
                if node.module:
                    found.add(node.module.split(".")[0])
                else:
                    found.update(a.name for a in node.names)
            elif node.module and (node.module == "kmsd" or node.module.startswith("kmsd.")):
                found.add(node.module.split(".")[1] if "." in node.module else "__init__")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("kmsd."):
                    found.add(a.name.split(".")[1])
    return found


def test_dependencies_point_one_way() -> None:
    for path in sorted((ROOT / "kmsd").glob("*.py")):
        name = path.stem
        assert name in ALLOWED, f"new module {name}: add it to the dependency table"
        extra = kmsd_imports(path) - ALLOWED[name]
        assert not extra, f"kmsd/{path.name} imports {extra}"


def test_client_imports_only_shared_errors() -> None:
    for path in (ROOT / "client").rglob("*.py"):
        assert kmsd_imports(path) <= {"errors"}, path
