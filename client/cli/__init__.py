"""The ``deltareg`` command line.

Exit codes: 0 success, 1 error, 2 usage error, 3 verification failed. Errors are one line on stderr; set
``DELTAREG_DEBUG=1`` for a traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Any

import click

from deltareg.client.errors import DeltaregError, VerificationFailed

# The one exception -> exit code table; the first matching class wins, so subclasses come first.
EXIT_CODES: list[tuple[type[BaseException], int]] = [
    (VerificationFailed, 3),
    (DeltaregError, 1),
    (OSError, 1),
]


def exit_code_for(exc: BaseException) -> int | None:
    return next((code for cls, code in EXIT_CODES if isinstance(exc, cls)), None)


def _debug() -> bool:
    return os.environ.get("DELTAREG_DEBUG", "") not in ("", "0", "false")


class DeltaregGroup(click.Group):
    """Turns known exceptions into one line on stderr and the table's exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            if _debug():
                traceback.print_exc()
            code = exit_code_for(exc)
            if code is None:
                click.echo(f"internal error: {type(exc).__name__}: {exc}", err=True)
                if not _debug():
                    click.echo("(set DELTAREG_DEBUG=1 for a traceback)", err=True)
                ctx.exit(1)
            click.echo(f"{'verification failed' if code == 3 else 'error'}: {exc}", err=True)
            ctx.exit(code)


@click.group(cls=DeltaregGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="deltareg")
def cli() -> None:
    """deltareg: a registry for LLM customization deltas (LoRA adapters, dense deltas)."""


def main() -> None:
    try:
        cli.main(prog_name="deltareg")
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


# Importing the command modules registers their commands on `cli`.
from deltareg.client.cli import (  # noqa: E402,F401
    admin,
    aliases,
    audit,
    commands,
    evals,
    gc,
    lineage,
    policies,
    results,
    signing,
    tokens,
    webhooks,
)
