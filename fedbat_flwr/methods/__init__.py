"""Methods by name. Importing this package registers every method module in it."""

import importlib
import pkgutil

from .base import (
    ClientUpdate,
    LocalTask,
    Method,
    client_task,
    get_method,
    method_names,
    register,
)

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in {"base", "common"} and not _module.ispkg:  # server/: on demand
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "ClientUpdate",
    "LocalTask",
    "Method",
    "client_task",
    "get_method",
    "method_names",
    "register",
]
