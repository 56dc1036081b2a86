"""Installs the consumer groups service (zq/node/groups.py) in a real node: `NodeConfig.services`
names this module, and the node calls `install(node)` before its loop starts. The service itself is
written against `zq.node.services.ServiceHost`, which the node is."""
from __future__ import annotations

from typing import Any

from zq.node.groups import GroupService

__all__ = ["GroupService", "install"]


def install(node: Any) -> GroupService:
    service = GroupService(node)
    node.add_service(service)
    return service
