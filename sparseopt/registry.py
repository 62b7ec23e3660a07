"""Name -> implementation tables with one ``register`` call per extension.

The library's extension points (sparsity distributions, DST methods, pruning
scores, models) are registries; the CLI's config validation and ``--help`` read
their choices from them, so a new method is one ``register`` call::

    from sparseopt import DST_METHODS, DSTUpdater

    @DST_METHODS.register("my_method")
    class MyMethod(DSTUpdater):
        def grow_scores(self, index, layer): ...
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Iterator
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered mapping of names to objects; unknown names raise a ``ValueError`` listing the known ones."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None, *, replace: bool = False) -> Any:
        """``registry.register("name", obj)``, or ``@registry.register("name")`` as a decorator."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a {self.kind} name must be a non-empty string, got {name!r}")

        def add(value: T) -> T:
            if name in self._items and not replace:
                raise ValueError(f"{self.kind} {name!r} is already registered (pass replace=True to override it)")
            self._items[name] = value
            return value

        return add if obj is None else add(obj)

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a test or a plugin that is done with it)."""
        self._items.pop(name, None)

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r}{did_you_mean(name, self._items)}; "
                             f"choose one of {list(self._items)}") from None

    def get(self, name: str, default: T | None = None) -> T | None:
        return self._items.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return list(self._items)

    def items(self):
        return self._items.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def closest(name: object, choices: Iterable[str]) -> str | None:
    """The choice most like ``name`` (a likely misspelling of it), or None."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return close[0] if close else None


def did_you_mean(name: object, choices: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices``, or ``""``."""
    match = closest(name, choices)
    return "" if match is None else f" (did you mean {match!r}?)"


def _parameters(fn) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # a builtin without a signature: accept anything
        return {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}


def accepts(fn, name: str) -> bool:
    """Whether ``fn`` (a class or function) names a parameter ``name`` in its signature."""
    return name in _parameters(fn)


def keyword_names(fn) -> list[str] | None:
    """The keyword parameters of ``fn``; ``None`` when it takes ``**kwargs`` that go anywhere.

    A class whose ``__init__`` passes ``**kwargs`` on to its base (``super().__init__(**kwargs)``, as the
    DST updaters do) takes its bases' parameters too: they are followed along the MRO.
    """
    chain = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c) and c is not object] if isinstance(fn, type) else [fn]
    names: list[str] = []
    for function in chain:
        params = list(_parameters(function).values())
        names += [p.name for p in params if p.name != "self" and p.name not in names
                  and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return names
    return None


def takes_keyword(fn, name: str) -> bool:
    """Whether ``fn`` takes the keyword ``name`` (:func:`keyword_names`; ``**kwargs`` that go anywhere take any)."""
    names = keyword_names(fn)
    return names is None or name in names


def check_keywords(fn, kwargs: dict[str, Any], what: str, reserved: dict[str, str] | None = None) -> None:
    """Refuse keywords that ``fn`` does not take, and those set elsewhere (``reserved``: name -> where), by name."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"the options of {what} must be a mapping of names to values, got {kwargs!r}")
    for key in kwargs:
        if reserved and key in reserved:
            raise ValueError(f"{key!r} of {what} is {reserved[key]}: not an extra option")
    names = keyword_names(fn)
    unknown = [k for k in kwargs if names is not None and k not in names]
    if unknown:
        free = [n for n in names if n not in (reserved or {}) and n not in ("self", "masks", "optimizer")]
        raise ValueError(f"{what} takes no option {unknown[0]!r}{did_you_mean(unknown[0], free)}; "
                         f"its further options: {free or 'none'}")
