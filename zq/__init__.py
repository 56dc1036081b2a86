"""zq: a brokerless distributed message queue."""
from zq import errors
from zq.client import Client, Message, RecordMetadata

__version__ = "0.1.0"
__all__ = ["Client", "Message", "RecordMetadata", "errors", "__version__"]
