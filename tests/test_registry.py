import pytest

from moekit.errors import UserError
from moekit.registry import Registry


def test_register_lookup_and_errors():
    reg = Registry("widget")
    assert reg.register("b", 2) == 2 and reg.register("a", 1) == 1
    assert reg.lookup("a") == 1 and reg.names() == ["a", "b"]
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a", 3)
    with pytest.raises(UserError, match="unknown widget 'c'; known: a, b"):
        reg.lookup("c")


def test_custom_unknown_message():
    reg = Registry("adapter", unknown="{name!r} is not supported; supported: {known}")
    reg.register("x", 0)
    with pytest.raises(UserError, match="'y' is not supported; supported: x"):
        reg.lookup("y")
