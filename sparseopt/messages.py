"""Small helpers for the words of messages."""

from __future__ import annotations


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``"1 class"``, ``"2 classes"``: the count with its noun in the right number."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_form or (noun + 'es' if noun.endswith(('s', 'sh', 'ch', 'x')) else noun + 's')}"
