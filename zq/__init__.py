"""zq: a brokerless distributed message queue."""
from zq import errors

__version__ = "0.1.0"
__all__ = ["errors", "__version__"]
