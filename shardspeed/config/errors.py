"""Errors raised for bad configuration, each naming the dotted key the user must change."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
    """A ds_config value or combination is wrong; the message names the key and the fix."""


def closest_key(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a misspelt `name` most likely meant, or None when nothing is close."""
    matches = difflib.get_close_matches(name, sorted(set(candidates)), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key_message(path: str, name: str, candidates: Iterable[str]) -> str:
    """'unknown key `a.b` — did you mean `a.c`?' with the best guess, when there is one."""
    dotted = f"{path}.{name}" if path else name
    guess = closest_key(name, candidates)
    hint = f" — did you mean `{f'{path}.{guess}' if path else guess}`?" if guess else ""
    return f"unknown config key `{dotted}`{hint}"
