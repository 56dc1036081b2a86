"""zq: a brokerless distributed message queue.

The client names are re-exported lazily (PEP 562), so that `import zq.core...` loads only the
standard library and what that module itself needs: the pure cores must not pull in pyzmq through
the package's own __init__.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Client", "Message", "RecordMetadata", "errors", "__version__"]

_LAZY = {"Client": "zq.client", "Message": "zq.client", "RecordMetadata": "zq.client", "errors": "zq.errors"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zq' has no attribute {name!r}")
    value = importlib.import_module(module)
    if name != "errors":
        value = getattr(value, name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
