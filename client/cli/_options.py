"""Options every command shares, and the output helper that honours --json."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import click

from deltareg.client.api import Registry
from deltareg.client.config import DEFAULT_URL

F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class Session:
    """What a command gets: where the registry is, and how to print."""

    url: str
    token: str | None
    as_json: bool
    _registry: Registry | None = field(default=None, repr=False)

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = Registry(self.url, self.token, progress=False if self.as_json else None)
        return self._registry

    def emit(self, data: Any, human: str | Callable[[], None]) -> None:
        """Print ``data`` as JSON with --json, else the human form (a string, or a function that prints)."""
        if self.as_json:
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        elif callable(human):
            human()
        else:
            click.echo(human)

    def note(self, message: str) -> None:
        """Progress and hints go to stderr so stdout stays clean for scripts."""
        if not self.as_json:
            click.echo(message, err=True)


def with_session(command: F) -> F:
    """Add --url, --token and --json to a command and pass it a Session as first argument."""

    @click.option(
        "--url",
        envvar="DELTAREG_URL",
        default=DEFAULT_URL,
        show_default=True,
        metavar="URL",
        help="Registry URL [env var: DELTAREG_URL].",
    )
    @click.option(
        "--token",
        envvar="DELTAREG_TOKEN",
        default=None,
        metavar="TOKEN",
        help="API token [env var: DELTAREG_TOKEN].",
    )
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
    @functools.wraps(command)
    def wrapper(url: str, token: str | None, as_json: bool, **kwargs: Any) -> Any:
        session = Session(url=url.rstrip("/"), token=token, as_json=as_json)
        try:
            return command(session, **kwargs)
        finally:
            if session._registry is not None:
                session._registry.close()

    return wrapper  # type: ignore[return-value]  # click decorators erase the precise type


def parse_pairs(pairs: tuple[str, ...], what: str) -> dict[str, str]:
    """``KEY=VALUE`` arguments to a dict; a malformed one is a usage error."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=what)
        result[key] = value
    return result


def parse_scores(pairs: tuple[str, ...]) -> dict[str, float]:
    """``NAME=VALUE`` scores; the value must be a finite number."""
    scores: dict[str, float] = {}
    for name, text in parse_pairs(pairs, "--eval").items():
        try:
            value = float(text)
        except ValueError:
            raise click.BadParameter(f"{name}: {text!r} is not a number", param_hint="--eval") from None
        if not math.isfinite(value):
            raise click.BadParameter(f"{name}: {text!r} is not a finite number", param_hint="--eval")
        scores[name] = value
    return scores
