"""zq.aio offers the sync client's API: the same names, parameters and defaults (zq.client.api)."""
from __future__ import annotations

import inspect

import pytest

from zq import aio
from zq.client import api
from zq.client.client import Client
from zq.client.consumer import Consumer
from zq.client.groups import GroupConsumer
from zq.client.producer import Producer

SYNC = {"Client": Client, "Producer": Producer, "Consumer": Consumer, "GroupConsumer": GroupConsumer}
AIO = {"Client": aio.Client, "Producer": aio.Producer, "Consumer": aio.Consumer, "GroupConsumer": aio.GroupConsumer}


def _public(cls: type) -> set[str]:
    return {n for n in dir(cls) if not n.startswith("_")}


def _params(fn: object) -> list[tuple[str, object, object]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind, p.default) for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", sorted(api.PUBLIC_API))
def test_the_list_names_every_public_method_of_both_surfaces(name: str) -> None:
    listed = set(api.PUBLIC_API[name]["methods"]) | set(api.PUBLIC_API[name]["attributes"])
    # Instance fields (resets, topic, ...) are set in __init__, so dir(class) shows only methods
    # and properties: each of those must be listed, and nothing listed may be missing.
    assert _public(SYNC[name]) <= listed, _public(SYNC[name]) - listed
    assert _public(AIO[name]) - set(api.AIO_ONLY.get(name, ())) <= listed
    for method in api.PUBLIC_API[name]["methods"]:
        assert callable(getattr(SYNC[name], method, None)), f"zq.{name}.{method} is missing"
        assert callable(getattr(AIO[name], method, None)), f"zq.aio.{name}.{method} is missing"


@pytest.mark.parametrize("name", sorted(api.PUBLIC_API))
def test_methods_take_the_same_parameters_with_the_same_defaults(name: str) -> None:
    for method in api.PUBLIC_API[name]["methods"]:
        sync_params = _params(getattr(SYNC[name], method))
        aio_params = _params(getattr(AIO[name], method))
        assert sync_params == aio_params, f"{name}.{method}: sync {sync_params} != aio {aio_params}"


def test_the_client_constructors_take_the_same_parameters() -> None:
    assert _params(Client.__init__) == _params(aio.Client.__init__)


def test_the_aio_consumers_expose_every_listed_attribute() -> None:
    # The aio wrappers read their attributes from the sync object: properties on the class.
    for name in ("Consumer", "GroupConsumer"):
        for attr in api.PUBLIC_API[name]["attributes"]:
            assert isinstance(inspect.getattr_static(AIO[name], attr, None), property), (name, attr)


def test_the_sync_consumers_set_every_listed_attribute() -> None:
    # Fields set in __init__ are not visible on the class: read them from the constructor's source.
    for name in ("Consumer", "GroupConsumer"):
        source = inspect.getsource(SYNC[name].__init__)
        for attr in api.PUBLIC_API[name]["attributes"]:
            assert f"self.{attr} =" in source or f"self.{attr}:" in source, (name, attr)


def test_a_group_consumer_starts_at_earliest_by_default_in_both() -> None:
    assert inspect.signature(Client.consumer).parameters["start"].default is None
    assert inspect.signature(aio.Client.consumer).parameters["start"].default is None
    assert inspect.signature(GroupConsumer.__init__).parameters["start"].default is None
