"""The pure cores load only the standard library (the wire codec, cbor2, loads at its first use): no zmq, no
RocksDB, no zeroconf, no CLI. Each module is imported in a fresh interpreter, so what another
test imported cannot hide what this one pulls in."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import zq
import zq.core

IO_PACKAGES = ("zmq", "rocksdict", "zeroconf", "typer", "rich", "prometheus_client")
CORE_MODULES = sorted(f"zq.core.{m.name}" for m in pkgutil.iter_modules(zq.core.__path__))


def _loaded_after_import(module: str) -> list[str]:
    code = (f"import sys, importlib; importlib.import_module({module!r}); "
            f"print(','.join(p for p in {IO_PACKAGES!r} if p in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return [p for p in out.stdout.strip().split(",") if p]


@pytest.mark.parametrize("module", CORE_MODULES)
def test_a_core_module_loads_no_io_package(module):
    assert _loaded_after_import(module) == []


def test_importing_zq_does_not_load_the_client_until_it_is_used():
    code = ("import sys, zq; before = 'zmq' in sys.modules; zq.Client; "
            "print(before, 'zmq' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]


# --- Where things may import from (docs/architecture.md "Layering"), read from the sources with ast. ---

ZQ_ROOT = Path(zq.__file__).parent
PURE_IMPORTABLE = ("zq.core.replication", "zq.node", "zq.core.groups", "zq.core.grouplead", "zq.core.groupstate",
                   "zq.core.client_rules", "zq.protocol", "zq.group_protocol", "zq.batch", "zq.limits", "zq.errors")
# What zq/core and zq/node may import from zq: each other, and these modules, which load only the standard
# library themselves (the wire codec, cbor2, is bound at its first use: see zq.protocol._dumps).
PURE_ZQ_MODULES = ("zq.protocol", "zq.group_protocol", "zq.batch", "zq.limits", "zq.errors", "zq.types",
                   "zq.hashing", "zq.dedupe")
PURE_PACKAGES = ("zq.core", "zq.node")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ZQ_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, at any depth (a function's too);
    `from zq import x` counts as zq.x, since x may be a module."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ""
    if path.is_relative_to(ZQ_ROOT):
        package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.append((node.lineno, base))
            if base in ("zq", "zq.core", "zq.node"):
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
    return out


def _sources(package: str) -> list[Path]:
    return sorted((ZQ_ROOT.parent / package.replace(".", "/")).rglob("*.py"))


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _pure_offences(paths: list[Path], allowed_zq: tuple[str, ...]) -> list[str]:
    """`path:line imports name` for each import of neither the standard library nor `allowed_zq`."""
    bad = []
    for path in paths:
        for line, name in _imports(path):
            top = name.split(".")[0]
            if (top == "zq" and name != "zq" and not _within(name, allowed_zq)) or (
                    top != "zq" and top not in sys.stdlib_module_names):
                bad.append(f"{path.name}:{line} imports {name}")
    return bad


def test_the_pure_modules_import_with_no_io_or_codec_package_installed():
    code = ("import sys; sys.modules.update(zmq=None, cbor2=None, rocksdict=None, zeroconf=None); "
            f"import {', '.join(PURE_IMPORTABLE)}")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]


def test_core_and_node_import_only_the_standard_library_and_the_pure_zq_modules():
    paths = [p for pkg in PURE_PACKAGES for p in _sources(pkg)]
    assert paths, "no sources found under zq/core and zq/node"
    assert _pure_offences(paths, PURE_PACKAGES + PURE_ZQ_MODULES) == []


def test_the_pure_zq_modules_import_only_the_standard_library_at_load():
    """What zq/core and zq/node may lean on leans on nothing else: the wire codec is imported in a
    function (at first use), never at module level."""
    bad = []
    for module in PURE_ZQ_MODULES:
        path = ZQ_ROOT.parent / (module.replace(".", "/") + ".py")
        tree = ast.parse(path.read_text())
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        for node in top_level:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] == "zq":
                    if not _within(name, PURE_PACKAGES + PURE_ZQ_MODULES) and name != "zq":
                        bad.append(f"{module}:{node.lineno} imports {name}")
                elif name.split(".")[0] not in sys.stdlib_module_names:
                    bad.append(f"{module}:{node.lineno} imports {name}")
    assert bad == []


def test_the_io_host_imports_neither_the_simulator_nor_the_client():
    bad = [f"{p.relative_to(ZQ_ROOT.parent)}:{line} imports {name}"
           for p in _sources("zq.io") for line, name in _imports(p) if _within(name, ("zq.sim", "zq.client"))]
    assert bad == []


def test_the_layering_check_sees_a_forbidden_import(tmp_path):
    """The checks above would catch an offence: a module importing zmq, the client, or the simulator."""
    (tmp_path / "m.py").write_text("import heapq\nimport zmq\nfrom zq.client import Client\n"
                                   "def f():\n    from zq.sim import cluster\n")
    offences = _pure_offences([tmp_path / "m.py"], PURE_PACKAGES + PURE_ZQ_MODULES)
    assert [o.split(" imports ")[1] for o in offences] == ["zmq", "zq.client", "zq.sim"]


def test_the_cores_configuration_entry_codec_writes_and_reads_what_cbor2_does():
    """zq.core.repl_types writes a configuration entry's CBOR itself (the core loads no codec): the bytes
    must be cbor2's, as entries already on disk were written by it."""
    import random

    import cbor2

    from zq.core.repl_types import CONFIG_PREFIX, decode_config, encode_config
    from zq.errors import ProtocolError

    rng = random.Random(10)
    for _ in range(300):
        names = sorted({"".join(chr(rng.choice((rng.randrange(33, 127), rng.randrange(0xA0, 0x3000))))
                                for _ in range(rng.choice((1, 5, 23, 24, 30, 255, 256, 300))))
                        for _ in range(rng.randrange(1, 65))})
        assert encode_config(names) == CONFIG_PREFIX + cbor2.dumps(names)
        assert decode_config(CONFIG_PREFIX + cbor2.dumps(names)) == tuple(names)
    for garbage in (b"", b"\x81", b"\x81\x61", b"\x9f\x61a\xff", b"\x81\x41a", b"\x81\x61a\x00", b"\x81\x62\xff\xfe",
                    cbor2.dumps(["a"] * 65)):
        with pytest.raises(ProtocolError):
            decode_config(CONFIG_PREFIX + garbage)


def _private_reaches(path: Path, owner_names: tuple[str, ...]) -> list[str]:
    """`file:line name._attr` for each private attribute read through a name or attribute that is one
    of `owner_names` (e.g. `client._hint_leader`, `self._client._conn`)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name in owner_names:
                out.append(f"{path.name}:{node.lineno} {name}.{node.attr}")
    return out


# zq/client/groups.py joins this list once it reaches the cluster through `client.cluster_view` too.
CLIENT_PARTS = ("producer.py", "consumer.py", "groups.py")


def test_producers_and_consumers_reach_the_cluster_through_the_view_not_the_clients_privates():
    bad = [r for name in CLIENT_PARTS for r in _private_reaches(ZQ_ROOT / "client" / name, ("client", "_client"))]
    assert bad == []


def test_the_private_reach_check_sees_one(tmp_path):
    (tmp_path / "m.py").write_text("def f(self, client):\n    client._hint_leader(1)\n"
                                   "    self._client._conn.call()\n    client.cluster_view.hint_leader(1)\n")
    assert _private_reaches(tmp_path / "m.py", ("client", "_client")) == ["m.py:2 client._hint_leader",
                                                                          "m.py:3 _client._conn"]


def _import_cycle(package: str) -> list[str]:
    """A cycle among `package`'s modules' module-level imports (as a list of names), or []."""
    graph = {}
    for path in _sources(package):
        tree = ast.parse(path.read_text())
        deps = set()
        for node in tree.body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                deps |= {n for n in names if n.startswith(package + ".")}
        graph[_module_name(path)] = deps
    seen: dict[str, int] = {}   # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> list[str]:
        seen[module] = 1
        for dep in sorted(graph.get(module, ())):
            if seen.get(dep) == 1:
                return path + [module, dep]
            if dep in graph and dep not in seen:
                found = visit(dep, path + [module])
                if found:
                    return found
        seen[module] = 2
        return []

    for module in sorted(graph):
        if module not in seen:
            found = visit(module, [])
            if found:
                return found
    return []


def test_the_cli_modules_import_one_another_without_a_circle():
    assert _import_cycle("zq.cli") == []


@pytest.mark.parametrize("module", sorted(_module_name(p) for p in _sources("zq.cli")))
def test_each_cli_module_imports_on_its_own(module):
    out = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
