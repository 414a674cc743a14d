"""User code named by configs: ``model.name: "my_pkg.models:blocks"``, ``data.name:
"my_pkg.data:load"``.

A model factory is called as ``factory(model_cfg, input_shape, num_classes)`` and returns the
model's blocks (a list of ``nn.Module``, split into stages like the built-in models); a data
factory as ``factory(data_cfg)`` and returns a ``decoupled.data.Dataset`` or the tensors
``(train_x, train_y, test_x, test_y)``. Every problem is a ``ConfigError`` naming the key: a path
that does not import, a name that is not a function, a signature that cannot take the call.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from decoupled.config import ConfigError

ARITY = {"model.name": 3, "data.name": 1}
SIGNATURE = {
    "model.name": "(model_cfg, input_shape, num_classes) -> list[nn.Module]",
    "data.name": "(data_cfg) -> Dataset or (train_x, train_y, test_x, test_y)",
}


def is_factory(name: str) -> bool:
    """Whether a ``model.name`` / ``data.name`` names user code ("module:function")."""
    return ":" in name


def load_factory(path: str, key: str) -> Callable[..., Any]:
    """The function ``path`` ("module.sub:function") names, checked to take the call ``key``
    makes of it."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: expected 'module:function', got {path!r}")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the module's own error while importing
        raise ConfigError(
            f"{key}: cannot import {module_name!r} ({type(err).__name__}: {err}); "
            "is it on PYTHONPATH or installed?"
        ) from None
    function = getattr(module, attr, None)
    if not callable(function):
        raise ConfigError(f"{key}: {module_name!r} has no function {attr!r}")
    try:
        inspect.signature(function).bind(*([None] * ARITY[key]))
    except TypeError as err:
        raise ConfigError(f"{key}: {path} must take {SIGNATURE[key]}: {err}") from None
    except ValueError:  # a builtin without a signature: trust it
        pass
    return function  # type: ignore[no-any-return]


def code_paths(names: list[str]) -> list[str]:
    """The files or package folders holding the modules of these factory names, for Ray to ship
    to the actors of a cluster (``runtime_env.py_modules``); installed packages are left out."""
    paths = []
    for name in names:
        if not is_factory(name):
            continue
        top = name.partition(":")[0].split(".")[0]
        spec = importlib.util.find_spec(top)
        if spec is None or spec.origin is None or "site-packages" in spec.origin:
            continue
        origin = Path(spec.origin)
        paths.append(str(origin.parent if origin.name == "__init__.py" else origin))
    return sorted(set(paths))
