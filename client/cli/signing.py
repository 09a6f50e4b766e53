"""``deltareg key generate|register|list|revoke``, ``deltareg sign`` and ``deltareg signatures``.

``--require-signature`` / ``--trusted-keys`` of pull, verify and apply are defined here too (TRUST).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, with_session
from deltareg.client.signing import (
    TRUSTED_KEYS_ENV,
    PublicKey,
    generate_key,
    read_public_key,
    read_trusted_keys,
)

F = TypeVar("F", bound=Callable[..., Any])


def trust_options(command: F) -> F:
    """``--require-signature`` and ``--trusted-keys FILE`` (repeatable) for a command that uses a version."""
    command = click.option(
        "--trusted-keys",
        "trusted_keys",
        multiple=True,
        type=click.Path(path_type=Path),
        metavar="FILE",
        help=f"A file of trusted public keys, one per line (repeatable; default: {TRUSTED_KEYS_ENV}).",
    )(command)
    return click.option(
        "--require-signature",
        is_flag=True,
        help="Refuse (exit 3) a version, or an ancestor, without a signature by a trusted key.",
    )(command)


def trusted_from_files(files: tuple[Path, ...]) -> list[PublicKey] | None:
    """The keys of ``--trusted-keys`` files; None when none is given (then DELTAREG_TRUSTED_KEYS counts)."""
    keys = [key for path in files for key in read_trusted_keys(path)]
    return keys or None


@cli.group()
def key() -> None:
    """Ed25519 signing keys: make a key pair, register public keys in a namespace, revoke them."""


@key.command("generate")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    metavar="KEYFILE",
    help="The private key file to create (mode 0600); the public key goes to KEYFILE.pub.",
)
@click.option("--comment", default=None, help="A note kept with the public key (who or what it is for).")
@with_session
def generate(session: Session, output: Path, comment: str | None) -> None:
    """Create a key pair; print the public key line and the key id. Existing files are never overwritten."""
    signing_key = generate_key(output, comment=comment)
    public = signing_key.public
    session.note(f"private key written to {output}; public key to {output}.pub")
    session.emit(
        {"key_id": public.key_id, "public_key": public.line(), "private_key_file": str(output)},
        f"{public.line()}\nkey id: {public.key_id}",
    )


@key.command("register")
@click.argument("namespace")
@click.argument("public_key_file", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="What or whom the key is for (default: the key's comment).")
@with_session
def register(session: Session, namespace: str, public_key_file: Path, name: str | None) -> None:
    """Register the public key in PUBLIC_KEY_FILE in NAMESPACE: its signatures count for its repos."""
    registered = session.registry.register_key(namespace, read_public_key(public_key_file), name)
    verb = "registered" if registered["created"] else "already registered"
    session.emit(registered, f"{verb} {registered['key_id']} in {namespace}")


@key.command("list")
@click.argument("namespace")
@with_session
def list_(session: Session, namespace: str) -> None:
    """The keys registered in NAMESPACE, oldest first, revoked ones marked."""
    found = session.registry.keys(namespace)

    def table() -> None:
        if not found:
            click.echo("no keys registered")
        for item in found:
            name = f"  {item['name']}" if item.get("name") else ""
            revoked = (
                f"  REVOKED {item['revoked_at']} by {item['revoked_by']}" if item.get("revoked_at") else ""
            )
            click.echo(f"{item['key_id']}{name}  by {item['actor']}  {item['created_at']}{revoked}")

    session.emit(found, table)


@key.command("revoke")
@click.argument("namespace")
@click.argument("key_id")
@with_session
def revoke(session: Session, namespace: str, key_id: str) -> None:
    """Revoke KEY_ID in NAMESPACE: signatures by it no longer satisfy a policy's signature rule."""
    revoked = session.registry.revoke_key(namespace, key_id)
    verb = "revoked" if revoked["changed"] else "already revoked"
    session.emit(revoked, f"{verb} {revoked['key_id']} in {namespace}")


@cli.command()
@click.argument("ref")
@click.option(
    "--key",
    "key_file",
    required=True,
    type=click.Path(path_type=Path),
    metavar="KEYFILE",
    help="The private key file (deltareg key generate); its public key must be registered.",
)
@with_session
def sign(session: Session, ref: str, key_file: Path) -> None:
    """Sign the version REF names (its manifest digest) and add the signature to the registry."""
    added = session.registry.sign(ref, key_file)
    verb = "signed" if added["created"] else "already signed"
    session.emit(added, f"{verb} {added['repo']}:{added['number']} {added['digest']} with {added['key_id']}")


@cli.command()
@click.argument("ref")
@with_session
def signatures(session: Session, ref: str) -> None:
    """The signatures of the version REF names, as the registry lists them (pull --require-signature
    verifies them locally)."""
    found = session.registry.signatures(ref)

    def table() -> None:
        if not found:
            click.echo("not signed")
        for item in found:
            revoked = "  (key revoked)" if item.get("key_revoked") else ""
            click.echo(f"{item['key_id']}  by {item['actor']}  {item['created_at']}{revoked}")

    session.emit(found, table)
