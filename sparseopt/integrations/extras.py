"""An optional dependency, imported by name, or one line saying which extra installs it."""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """A framework an integration needs is not installed; the message is the install command."""


def require(module: str, extra: str, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs {module.split('.')[0]} ({e}): pip install 'sparseopt[{extra}]'") from None
