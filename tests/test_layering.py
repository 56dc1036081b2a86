"""The pure cores load only the standard library (and, for now, cbor2 where noted): no zmq, no
RocksDB, no zeroconf, no CLI. Each module is imported in a fresh interpreter, so what another
test imported cannot hide what this one pulls in."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

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
