"""``__all__`` of ``outbox`` and ``outbox.receiver`` names exactly what they export.

Every name in it is importable, each list is sorted (isort-style, as ruff's RUF022 keeps it:
CONSTANTS, then Classes, then functions) without repeats, every other public attribute is a
submodule, and the names a README reader types are there.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

import outbox
import outbox.errors
import outbox.receiver

PACKAGES = [pytest.param(outbox, id="outbox"), pytest.param(outbox.receiver, id="receiver")]

# What README.md imports, or names as importable from these two packages.
README_OUTBOX = {
    "Outbox",
    "serve",
    "Receiver",
    "Incoming",
    "Batch",
    "Reject",
    "Refuse",
    "ConnectRequest",
    "ReceiverStats",
    "State",
    "Stats",
}
README_RECEIVER = {
    "serve",
    "Receiver",
    "Incoming",
    "Batch",
    "Reject",
    "Refuse",
    "ConnectRequest",
    "ReceiverStats",
}


def isort_key(name: str) -> tuple[int, str]:
    if name.isupper():
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_is_importable(package: types.ModuleType) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from {package.__name__} import *", namespace)
    namespace.pop("__builtins__")
    assert sorted(namespace) == sorted(package.__all__)
    for name in package.__all__:
        assert namespace[name] is getattr(package, name)


@pytest.mark.parametrize("package", PACKAGES)
def test_all_is_sorted_without_repeats(package: types.ModuleType) -> None:
    names = list(package.__all__)
    assert all(isinstance(name, str) for name in names)
    assert len(names) == len(set(names)), "a name appears twice in __all__"
    assert names == sorted(names, key=isort_key)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_other_public_attribute_is_a_submodule(package: types.ModuleType) -> None:
    public = {
        name
        for name, value in vars(package).items()
        if not name.startswith("_")
        and name != "annotations"  # from __future__ import annotations
        and not isinstance(value, types.ModuleType)
    }
    assert public - set(package.__all__) == set(), "public but not in __all__"


def test_the_readme_names_are_exported() -> None:
    assert set(outbox.__all__) >= README_OUTBOX
    assert set(outbox.receiver.__all__) >= README_RECEIVER
    for name in README_RECEIVER:
        assert getattr(outbox, name) is getattr(outbox.receiver, name)


def test_every_error_is_exported_from_the_top() -> None:
    errors = {
        name: value
        for name, value in vars(outbox.errors).items()
        if isinstance(value, type)
        and issubclass(value, Exception)
        and value.__module__ == "outbox.errors"
    }
    assert "OutboxError" in errors and len(errors) > 5
    for name, error in errors.items():
        assert issubclass(error, outbox.OutboxError), f"{name} is not under OutboxError"
        assert name in outbox.__all__, f"{name} is not exported by outbox"
        assert getattr(outbox, name) is error
