"""The commands of the CLI contract in DESIGN.md; each one parses, calls the library, and prints."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from deltareg.client.api import VersionInfo
from deltareg.client.cli import cli
from deltareg.client.cli._options import Session, parse_pairs, parse_scores, with_session
from deltareg.client.cli.audit import Moment
from deltareg.client.cli.evals import measured_on
from deltareg.client.cli.lineage import parse_datasets, parse_hyperparameters, training_lines
from deltareg.client.cli.signing import trust_options, trusted_from_files
from deltareg.client.dense import ENCODINGS, DenseParams, DenseStats, Encoding, main_dtype
from deltareg.client.fingerprint import fingerprint_path
from deltareg.client.refs import Reference

EXISTING_PATH = click.Path(exists=True, path_type=Path)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n} B"


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the embedded default (SQLite + blob folder) [env var: DELTAREG_DATA_DIR].",
)
@with_session
def serve(session: Session, host: str, port: int, data_dir: Path | None) -> None:
    """Run the registry server (embedded default: SQLite + a blob folder in DATA_DIR)."""
    try:
        from deltareg.registry.serve import run
    except ImportError as exc:
        raise click.UsageError(
            f"the server is not installed ({exc}); pip install 'deltareg[server]'"
        ) from exc
    run(host=host, port=port, data_dir=str(data_dir) if data_dir else None)


@cli.command("hash")
@click.argument("model", type=EXISTING_PATH)
@with_session
def hash_(session: Session, model: Path) -> None:
    """Print the base fingerprint of a model folder or safetensors file."""
    fp = fingerprint_path(model)
    session.emit({"model": str(model), "fingerprint": fp.value, "tensors": len(fp.tensors)}, fp.value)


@cli.command()
@click.argument("base", type=EXISTING_PATH)
@click.argument("tuned", type=EXISTING_PATH)
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="New delta folder.")
@click.option(
    "--encoding",
    type=click.Choice(ENCODINGS),
    default="xor",
    show_default=True,
    help="xor: bits of tuned XOR bits of base; add: tuned - base in fp32 (both reproduce TUNED bit for bit).",
)
@click.option("--no-compress", is_flag=True, help="Store the delta tensors raw instead of zstd-compressed.")
@with_session
def diff(
    session: Session, base: Path, tuned: Path, output: Path, encoding: Encoding, no_compress: bool
) -> None:
    """Write the dense delta (kind "full") that turns BASE into TUNED, a full fine-tune of it, to OUTPUT.

    Identical tensors are left out; new or resized tensors (a resized embedding) are stored whole; files
    of TUNED that differ from BASE's (config.json, tokenizer files) are carried along. Push OUTPUT with
    `deltareg push OUTPUT REPO --base BASE`.
    """
    from deltareg.client.diff import diff_models

    result = diff_models(
        base,
        tuned,
        output,
        encoding=encoding,
        compression="none" if no_compress else "zstd",
    )
    params = result.params
    replaced = sum(1 for e in params.tensors.values() if e.op == "replace")
    for name in result.skipped_files:
        session.note(f"skipped {name}: not a name a version can carry")
    session.emit(
        {
            "output": str(result.output),
            "tensors_changed": len(params.tensors),
            "tensors_replaced": replaced,
            "tensors_identical": params.stats.identical,
            "files": params.files,
            "changed_bytes": params.stats.changed_bytes,
            "stored_bytes": params.stats.stored_bytes,
            "ratio": round(params.stats.ratio, 3),
            "result_fingerprint": params.result_fingerprint,
            "skipped_files": result.skipped_files,
        },
        f"wrote {result.output}: {len(params.tensors)} tensors changed ({replaced} stored whole), "
        f"{params.stats.identical} identical left out, {len(params.files)} files carried; "
        f"{_compression_line(params.stats)}",
    )


def _compression_line(stats: DenseStats) -> str:
    stored, changed = _size(stats.stored_bytes), _size(stats.changed_bytes)
    return f"{stored} stored for {changed} of changed weights ({stats.ratio:.2f}x)"


@cli.command()
@click.argument("delta", type=EXISTING_PATH)
@click.argument("repo")
@click.option(
    "--base",
    required=True,
    metavar="MODEL|FINGERPRINT",
    help="Base model folder/file (checked and fingerprinted) or its tmv1: fingerprint.",
)
@click.option("--base-name", default=None, help="Human name of the base model (e.g. its hub id).")
@click.option("--base-revision", default=None, help="Revision of the base model.")
@click.option("--parent", default=None, metavar="REF", help="The version this delta stacks on.")
@click.option("--eval", "evals", multiple=True, metavar="NAME=VALUE", help="A score to record (repeatable).")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Training metadata (repeatable).")
@click.option(
    "--dataset", "datasets", multiple=True, metavar="NAME[@REVISION]", help="A training dataset (repeatable)."
)
@click.option("--code-commit", default=None, metavar="SHA", help="Commit of the training code.")
@click.option(
    "--hparam",
    "hparams",
    multiple=True,
    metavar="KEY=VALUE",
    help="A hyperparameter (repeatable; a number is recorded as a number).",
)
@click.option(
    "--sign-key",
    type=click.Path(path_type=Path),
    default=None,
    metavar="KEYFILE",
    help="Sign the new version with this private key (registered in the namespace; checked first).",
)
@with_session
def push(
    session: Session,
    delta: Path,
    repo: str,
    base: str,
    base_name: str | None,
    base_revision: str | None,
    parent: str | None,
    evals: tuple[str, ...],
    meta: tuple[str, ...],
    datasets: tuple[str, ...],
    code_commit: str | None,
    hparams: tuple[str, ...],
    sign_key: Path | None,
) -> None:
    """Push DELTA as a new version of REPO (namespace/name): a PEFT LoRA adapter folder, or a dense delta
    folder written by `deltareg diff` (its compression ratio is shown)."""
    result = session.registry.push(
        delta,
        repo,
        base=base,
        parent=parent,
        evals=parse_scores(evals),
        metadata=parse_pairs(meta, "--meta"),
        base_name=base_name,
        base_revision=base_revision,
        datasets=parse_datasets(datasets),
        code_commit=code_commit,
        hyperparameters=parse_hyperparameters(hparams),
        sign_key=sign_key,
    )
    v = result.version
    if result.created:
        uploaded = f"{result.uploaded_blobs} blobs, {_size(result.uploaded_bytes)} uploaded"
        human = f"pushed {v.ref} {v.digest} ({uploaded})"
    else:
        human = f"{v.ref} already holds exactly this delta {v.digest} (nothing uploaded)"
    if result.signature is not None:
        human += f"\nsigned with {result.signature['key_id']}"
    extra: dict[str, Any] = {}
    if v.kind == "full":
        stats = DenseParams.model_validate(v.manifest.params).stats
        human += f"\ndense delta: {_compression_line(stats)}"
        extra = {
            "stored_bytes": stats.stored_bytes,
            "changed_bytes": stats.changed_bytes,
            "ratio": stats.ratio,
        }
    session.emit(
        {
            **v.summary(),
            "created": result.created,
            "uploaded_blobs": result.uploaded_blobs,
            "uploaded_bytes": result.uploaded_bytes,
            "signature": result.signature,
            **extra,
        },
        human,
    )


ALLOW_YANKED = click.option(
    "--allow-yanked",
    is_flag=True,
    help="Use a yanked version anyway: one named exactly (REPO:N, REPO@sha256:...), or a yanked ancestor.",
)


@cli.command()
@click.argument("ref")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="Copy the verified version to this folder (absent or empty).",
)
@ALLOW_YANKED
@trust_options
@with_session
def pull(
    session: Session,
    ref: str,
    output: Path | None,
    allow_yanked: bool,
    require_signature: bool,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Download and verify REF; print the local folder (it loads with PeftModel.from_pretrained)."""
    registry = session.registry
    info = registry.resolve(ref, allow_yanked=allow_yanked)
    cached = registry.cache.lookup(info.digest) is not None
    pulled = registry.pull_version(
        info,
        output=output,
        allow_yanked=allow_yanked,
        require_signature=require_signature,
        trusted_keys=trusted_from_files(trusted_keys),
    )
    session.note(f"{info.ref} {info.digest} {'(cached)' if cached else '(downloaded and verified)'}")
    session.emit({**info.summary(), "path": str(pulled.path), "cached": cached}, str(pulled.path))


@cli.command()
@click.argument("target", metavar="REF|DIR")
@click.option("--base", type=EXISTING_PATH, default=None, help="Also check that MODEL is the delta's base.")
@ALLOW_YANKED
@trust_options
@with_session
def verify(
    session: Session,
    target: str,
    base: Path | None,
    allow_yanked: bool,
    require_signature: bool,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Verify a pulled folder or a reference: file digests, manifest digest, and optionally the base
    and the signature."""
    record = session.registry.verify(
        target,
        base=base,
        allow_yanked=allow_yanked,
        require_signature=require_signature,
        trusted_keys=trusted_from_files(trusted_keys),
    )
    files = len(record.manifest.files)
    human = f"verified {record.repo}:{record.number} {record.digest}: {files} files" + (
        f"; base {base} matches {record.manifest.base.fingerprint}" if base else ""
    )
    session.emit(
        {
            "repo": record.repo,
            "number": record.number,
            "digest": record.digest,
            "files": files,
            "base_checked": base is not None,
            "verified": True,
        },
        human,
    )


@cli.command()
@click.argument("ref")
@click.option("--base", required=True, type=EXISTING_PATH, help="The base model folder or safetensors file.")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Merged model folder.")
@click.option(
    "--fast",
    is_flag=True,
    help="Check only the touched base tensors' digests instead of the whole fingerprint.",
)
@click.option(
    "--expect",
    default=None,
    metavar="FINGERPRINT|recorded",
    help='The merged model must have this fingerprint ("recorded": the one recorded on the version for the '
    "base's dtype); otherwise exit 3 and nothing is written.",
)
@click.option("--record", is_flag=True, help="Record the merged model's fingerprint on the version.")
@ALLOW_YANKED
@trust_options
@with_session
def apply(
    session: Session,
    ref: str,
    base: Path,
    output: Path,
    fast: bool,
    expect: str | None,
    record: bool,
    allow_yanked: bool,
    require_signature: bool,
    trusted_keys: tuple[Path, ...],
) -> None:
    """Write BASE + delta REF to OUTPUT, file to file; refuses a base the delta was not made for.

    Prints OUTPUT and the merged model's fingerprint (with --fast, only when --expect or --record asks
    for it, since it needs the whole base's digests)."""
    registry = session.registry
    if fast and record and expect is None:
        raise click.UsageError(
            "--record with --fast needs --expect (the fast mode does not hash the whole base)"
        )
    result = registry.apply(
        ref,
        base,
        output,
        verify="touched" if fast else "full",
        allow_yanked=allow_yanked,
        expect=expect,
        require_signature=require_signature,
        trusted_keys=trusted_from_files(trusted_keys),
    )
    recorded = None
    if record and result.fingerprint is not None:
        dtype = main_dtype(fingerprint_path(base, cache=registry.fingerprints).tensors)
        recorded = registry.record_result(ref, dtype, result.fingerprint)
    session.emit(
        {
            "ref": ref,
            "output": str(result.output),
            "tensors_changed": result.tensors_changed,
            "files": result.files_written,
            "fingerprint": result.fingerprint,
            "recorded": recorded,
        },
        "\n".join(
            [
                str(result.output),
                *([f"fingerprint: {result.fingerprint}"] if result.fingerprint else []),
                *([f"recorded as the expected result for {recorded['base_dtype']}"] if recorded else []),
            ]
        ),
    )


@cli.command("list")
@click.argument("namespace", required=False)
@with_session
def list_(session: Session, namespace: str | None) -> None:
    """List repositories (optionally of one NAMESPACE)."""
    repos = session.registry.list_repos(namespace)

    def table() -> None:
        if not repos:
            click.echo("no repositories")
        for r in repos:
            latest = f":{r['latest']}" if r["latest"] else ""
            count = f"{r['versions']} version{'s' if r['versions'] != 1 else ''}"
            click.echo(f"{r['name']}{latest}\t{count}\t{r['created_at']}")

    session.emit({"repos": repos}, table)


@cli.command()
@click.argument("ref")
@click.option(
    "--at",
    "at",
    type=Moment(),
    default=None,
    help="With REPO@ALIAS: the version the alias pointed to at TIME (ISO 8601; local time without offset).",
)
@with_session
def show(session: Session, ref: str, at: datetime | None) -> None:
    """Show a version: digest, base, parent, files, parameters and metadata."""
    # A yanked version named exactly is shown (with why it was yanked): it stays readable for audit.
    info = session.registry.resolve(ref, allow_yanked=True) if at is None else _alias_at(session, ref, at)
    results = session.registry.expected_results(info.ref)
    session.emit(
        {**info.summary(), "manifest": info.manifest.to_json_obj(), "results": results},
        lambda: _print_version(info, results),
    )


def _alias_at(session: Session, ref: str, at: datetime) -> VersionInfo:
    reference = Reference.parse(ref)
    if reference.alias is None:
        raise click.BadParameter("--at needs a reference to an alias (REPO@ALIAS)", param_hint="REF")
    info = session.registry.alias_at(str(reference.repo), reference.alias, at)
    session.note(f"{ref} pointed to {info.ref} at {at.astimezone(UTC).isoformat()}")
    return info


def _yank_line(yanked: dict[str, Any]) -> str:
    by = f"by {yanked['by']}, " if yanked.get("by") else ""
    return f"yanked:   {yanked['reason']} ({by}{yanked['at']})"


def _print_version(info: VersionInfo, results: dict[str, str]) -> None:
    m = info.manifest
    base_name = f" ({m.base.name}{'@' + m.base.revision if m.base.revision else ''})" if m.base.name else ""
    lines = [
        f"{info.ref}  {info.digest}",
        f"kind:     {info.kind}",
        f"base:     {m.base.fingerprint}{base_name}",
        f"parent:   {info.parent or '-'}",
        f"created:  {info.created_at}" + (f" by {info.pushed_by}" if info.pushed_by else ""),
        *([_yank_line(info.yanked)] if info.yanked else []),
        "files:",
        *(f"  {f.path}  {_size(f.size)}  {f.digest}" for f in m.files),
    ]
    modules: dict[str, Any] = m.params.get("modules", {})
    if modules:
        ranks = sorted({int(p["r"]) for p in modules.values()})
        lines.append(f"lora:     {len(modules)} modules, r={','.join(map(str, ranks))}")
    if info.kind == "full":
        dense = DenseParams.model_validate(m.params)
        lines.append(
            f"dense:    {len(dense.tensors)} tensors ({dense.encoding}, {dense.compression}), "
            f"{_compression_line(dense.stats)}"
        )
    lines += [f"result:   {dtype} base -> {fingerprint}" for dtype, fingerprint in sorted(results.items())]
    lines += [f"eval:     {e['name']}={e['value']}{measured_on(e)}" for e in info.evals]
    lines += training_lines(m.metadata)
    click.echo("\n".join(lines))
