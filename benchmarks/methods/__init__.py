"""The benchmarked self-supervised methods, one module each.

A method named ``x`` lives in ``benchmarks/methods/x.py`` and defines one class with
``name = "x"`` and the interface of :class:`benchmarks.methods.base.BenchmarkMethod`
(``from_config``, ``make_transform``, ``backbone_features``, a Lightning
``training_step``). Adding a method is adding such a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

# The order of the tables and plots; methods not listed follow alphabetically.
METHOD_ORDER = ("msn", "msn_lightly", "pmsn", "dino", "ibot", "simclr", "byol", "mae")
_NOT_METHODS = frozenset({"base"})


def available_methods() -> list[str]:
    """Names of all method modules, in table order."""
    names = {
        module.name
        for module in pkgutil.iter_modules(__path__)
        if module.name not in _NOT_METHODS and not module.name.startswith("_")
    }
    return sorted(names, key=method_sort_key)


def method_sort_key(name: str) -> tuple[int, str]:
    order = METHOD_ORDER.index(name) if name in METHOD_ORDER else len(METHOD_ORDER)
    return order, name


def load_method(name: str) -> Any:
    """The method class of ``benchmarks/methods/<name>.py``."""
    if name not in available_methods():
        raise ValueError(
            f"unknown method {name!r}; available: {', '.join(available_methods())}"
        )
    module = importlib.import_module(f"{__name__}.{name}")
    for value in vars(module).values():
        if (
            isinstance(value, type)
            and value.__module__ == module.__name__
            and getattr(value, "name", None) == name
        ):
            return value
    raise ValueError(
        f"benchmarks/methods/{name}.py defines no class with name={name!r}"
    )
