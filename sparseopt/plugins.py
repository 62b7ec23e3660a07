"""Plugins: packages that add DST methods, models, distributions, prune scores or scale sources.

A plugin is an installed package that declares an entry point in the group
``sparseopt.plugins`` (``pyproject.toml``)::

    [project.entry-points."sparseopt.plugins"]
    my_methods = "my_package:register"      # a function called once, or a module imported once

The command line (``sparseopt train``, ``sweep``, ``report``, and so every process
that torchrun or a sweep starts) loads every plugin before it reads a config, so
what a plugin registers is a choice of ``--dst``, ``--model``, ``--distribution``,
``--prune-score`` and ``--scale-source`` and can be used in sweep files. Python
code that uses the library directly calls :func:`load_plugins` itself, or simply
imports its own package. ``SPARSEOPT_PLUGINS=module[:function],...`` loads plugins
that are not installed as packages (a module on ``PYTHONPATH``). docs/plugins.md
has a complete example.
"""

from __future__ import annotations

import importlib
import os
from importlib.metadata import entry_points
from types import ModuleType

ENTRY_POINT_GROUP = "sparseopt.plugins"
ENV_VAR = "SPARSEOPT_PLUGINS"
_loaded: dict[str, str] = {}  # "module:attr" -> where it came from


class PluginError(ValueError):
    """A plugin failed to import or to register (a user error: one line, exit 2)."""


def _call(obj: object) -> None:
    if callable(obj) and not isinstance(obj, ModuleType):
        obj()


def load_plugins() -> dict[str, str]:
    """Load every plugin not loaded yet, once per process; returns ``{"module:attr": source}`` of all loaded.

    Raises :class:`PluginError` naming the plugin and its error when one fails.
    """
    found = [(ep.value, f"entry point {ep.name!r} of {getattr(ep.dist, 'name', 'an installed package')}", ep.load)
             for ep in entry_points(group=ENTRY_POINT_GROUP)]
    for spec in filter(None, (s.strip() for s in os.environ.get(ENV_VAR, "").split(","))):
        found.append((spec, f"{ENV_VAR}", lambda spec=spec: _import(spec)))
    for target, source, load in found:
        if target in _loaded:
            continue
        try:
            _call(load())
        except Exception as e:  # noqa: BLE001 - any failure of third-party code becomes one clear line
            raise PluginError(f"plugin {target} ({source}) failed to load: {type(e).__name__}: {e}") from e
        _loaded[target] = source
    return dict(_loaded)


def _import(spec: str) -> object:
    module, _, attr = spec.partition(":")
    obj: object = importlib.import_module(module)
    for part in filter(None, attr.split(".")):
        obj = getattr(obj, part)
    return obj
