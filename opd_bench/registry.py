"""A small name -> factory registry with lazy imports and "did you mean" errors.

Entries are stored as ``"package.module:attribute"`` strings so that listing names or
building the CLI never imports torch, transformers or an OCR engine. The target is imported
only when ``get`` is called.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any, Callable


def did_you_mean(name: str, names) -> str:
    """`` Did you mean 'x'?`` for the closest of ``names`` ignoring case ("TINY" -> 'tiny'), or ``""``."""
    folded = {str(n).casefold(): n for n in names}
    close = difflib.get_close_matches(str(name).casefold(), list(folded), n=1, cutoff=0.6)
    return f" Did you mean {folded[close[0]]!r}?" if close else ""


class UnknownOptionError(ValueError):
    """A keyword option a factory does not take; the message names the close one and all of them."""


def option_names(factory: Callable[..., Any]) -> list[str] | None:
    """The keyword options ``factory`` takes (None: any). A class whose ``__init__`` passes
    ``**options`` on to its base's takes the base's too."""
    steps = ([c.__init__ for c in factory.__mro__ if "__init__" in vars(c) and c is not object]
             if inspect.isclass(factory) else [factory])
    names: list[str] = []
    for step in steps:
        parameters = inspect.signature(step).parameters.values()
        names += [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                  and p.name != "self" and p.name not in names]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return names
    return names if inspect.isclass(factory) else None  # a class's **options end at object, which takes none


def required_options(factory: Callable[..., Any]) -> list[str]:
    """The keyword options ``factory`` has no default for."""
    step = factory.__init__ if inspect.isclass(factory) else factory
    return [p.name for p in inspect.signature(step).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.default is p.empty and p.name != "self"]


def check_options(what: str, factory: Callable[..., Any], options) -> None:
    """An ``UnknownOptionError`` for the first option ``factory`` does not take, or lacks: a misspelt
    or missing option would otherwise surface as a TypeError traceback from deep inside the build."""
    accepted = option_names(factory)
    unknown = sorted(set(options) - set(accepted)) if accepted is not None else []
    if unknown:
        raise UnknownOptionError(f"{what} has no option {unknown[0]!r}.{did_you_mean(unknown[0], accepted)} "
                                 f"Its options: {', '.join(accepted) or 'none'}")
    missing = [name for name in required_options(factory) if name not in options]
    if missing:
        raise UnknownOptionError(f"{what} needs the option {missing[0]!r}; its options: {', '.join(accepted or missing)}")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0])


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, str | Callable[..., Any]] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, target: str | Callable[..., Any], help: str = "") -> None:
        """Register ``target`` (a ``"module:attr"`` string or the object itself) under ``name``."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = target
        self._help[name] = help

    def names(self) -> list[str]:
        return sorted(self._entries)

    def help(self, name: str) -> str:
        self._check(name)
        return self._help[name]

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def _check(self, name: str) -> None:
        if name in self._entries:
            return
        raise UnknownNameError(
            f"unknown {self.kind} {name!r}.{did_you_mean(name, self.names())} Known {self.kind}s: {', '.join(self.names()) or '(none)'}."
        )

    def resolve(self, name: str) -> Any:
        """Return the registered object, importing its module on first use."""
        self._check(name)
        target = self._entries[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module_name), attr)
            self._entries[name] = target
        return target
