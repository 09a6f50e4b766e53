"""Shared fixtures: tiny models and adapters built locally (no downloads), and test isolation.

Fixtures (all builders are session-scoped and cache their results, so each distinct model or adapter is
built once per test process; everything they return is on disk, never a shared in-memory object, so a
test can freely modify what it loads):

``tiny_llama(*, dtype="float32", seed=0, sharded=False, tie_word_embeddings=False) -> Path``
    A random-init ``LlamaForCausalLM`` (hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128,
    vocab 256) saved with ``save_pretrained``. ``sharded=True`` saves it in at least 3 shards with a
    ``model.safetensors.index.json``. A different ``seed`` gives a "different base": same names, shapes
    and dtypes, other values. Load it with ``AutoModelForCausalLM.from_pretrained(path)`` (the dtype is
    taken from the files).

``tiny_gpt2(*, seed=0) -> Path``
    A random-init ``GPT2LMHeadModel`` (n_embd 64, 2 layers): Conv1D layers store W as (in, out), so LoRA
    needs ``fan_in_fan_out=True``; its lm_head is tied to the input embeddings.

``lora_adapter(base, *, r=8, alpha=16, target_modules=("q_proj", "v_proj"), use_rslora=False,
rank_pattern=None, alpha_pattern=None, fan_in_fan_out=False, seed=1, lora_bias=False, modules_to_save=(),
use_dora=False) -> Path``
    A PEFT LoRA adapter for the model saved at ``base``, made with ``get_peft_model`` and saved with
    ``PeftModel.save_pretrained`` (default adapter name). LoRA B is zero at init, which would make every
    apply a no-op, so A and B are both filled with seeded random values large enough to change bf16
    weights (so are the embedding factors and lora_B's bias); the modules_to_save copies get seeded
    noise added, and with use_dora the magnitude vectors are multiplied by seeded (1 + noise).

``lora_manifest(adapter, base, *, with_tensors=True) -> Manifest``
    The manifest ``push`` would make for that adapter on that base: files with sha256 digests, the base
    fingerprint and (unless ``with_tensors=False``) the digests of the tensors it touches. The adapter
    folder doubles as the version folder.

``copy_folder(src) -> Path``
    A fresh copy of a folder in the test's tmp_path (for tests that edit an adapter or a model).

Every test also gets its own ``DELTAREG_CACHE_DIR`` (autouse), so nothing reads or writes ~/.cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from _support.auth import TEST_TOKEN

# Quiet and offline before transformers is ever imported (it is imported lazily, only by tests that use
# models, so that the registry tests do not pay for it).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

LLAMA_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 128,
}
# Values of the random LoRA factors: with alpha/r = 2 the delta is about as large as the weights
# (initializer_range 0.02), so it changes most bf16 elements.
LORA_FACTOR_STD = 0.05


def pytest_configure(config: pytest.Config) -> None:
    # PEFT calls a transformers method that transformers 5 deprecates; not ours to fix, only noise.
    config.addinivalue_line(
        "filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    )


@pytest.fixture(scope="session", autouse=True)
def _test_tokens(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Every server started in this session accepts TEST_TOKEN as its admin token and every client sends
    it (tests/_support/auth.py); CLI credentials live in a folder of the session's own, never in ~."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DELTAREG_BOOTSTRAP_TOKEN", TEST_TOKEN)
        patch.setenv("DELTAREG_TOKEN", TEST_TOKEN)
        patch.setenv("DELTAREG_CONFIG_DIR", str(tmp_path_factory.mktemp("deltareg-config")))
        yield


@pytest.fixture(autouse=True)
def _isolated_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DELTAREG_CACHE_DIR", str(tmp_path_factory.mktemp("deltareg-cache")))


def _quiet_transformers() -> None:
    import transformers

    logging: Any = transformers.logging  # untyped module functions
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _save_model(model: Any, folder: Path, sharded: bool) -> None:
    if sharded:
        total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        model.save_pretrained(folder, max_shard_size=total // 4)  # >= 3 shards, whatever the dtype
    else:
        model.save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of tiny random Llama models on disk; see the module docstring."""
    built: dict[tuple[Any, ...], Path] = {}

    def build(
        *, dtype: str = "float32", seed: int = 0, sharded: bool = False, tie_word_embeddings: bool = False
    ) -> Path:
        key = (dtype, seed, sharded, tie_word_embeddings)
        if key not in built:
            import torch
            from transformers import LlamaConfig, LlamaForCausalLM

            _quiet_transformers()
            config = LlamaConfig(**LLAMA_DIMS, tie_word_embeddings=tie_word_embeddings)
            torch.manual_seed(seed)
            model = LlamaForCausalLM(config).to(getattr(torch, dtype))
            folder = tmp_path_factory.mktemp(f"llama-{dtype}-s{seed}{'-sharded' if sharded else ''}")
            _save_model(model, folder, sharded)
            built[key] = folder
        return built[key]

    return build


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of tiny random GPT-2 models (Conv1D, fan_in_fan_out) on disk."""
    built: dict[int, Path] = {}

    def build(*, seed: int = 0) -> Path:
        if seed not in built:
            import torch
            from transformers import GPT2Config, GPT2LMHeadModel

            _quiet_transformers()
            config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128)
            torch.manual_seed(seed)
            model = GPT2LMHeadModel(config)
            folder = tmp_path_factory.mktemp(f"gpt2-s{seed}")
            model.save_pretrained(folder)
            built[seed] = folder
        return built[seed]

    return build


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Builder of PEFT LoRA adapters with random non-zero A and B; see the module docstring."""
    built: dict[tuple[Any, ...], Path] = {}

    def build(
        base: Path,
        *,
        r: int = 8,
        alpha: int = 16,
        target_modules: Sequence[str] = ("q_proj", "v_proj"),
        use_rslora: bool = False,
        rank_pattern: dict[str, int] | None = None,
        alpha_pattern: dict[str, float] | None = None,
        fan_in_fan_out: bool = False,
        seed: int = 1,
        lora_bias: bool = False,
        modules_to_save: Sequence[str] = (),
        use_dora: bool = False,
    ) -> Path:
        key = (
            str(base),
            r,
            alpha,
            tuple(target_modules),
            use_rslora,
            tuple((rank_pattern or {}).items()),
            tuple((alpha_pattern or {}).items()),
            fan_in_fan_out,
            seed,
            lora_bias,
            tuple(modules_to_save),
            use_dora,
        )
        if key not in built:
            import torch
            from peft import LoraConfig, get_peft_model
            from transformers import AutoModelForCausalLM

            _quiet_transformers()
            model = AutoModelForCausalLM.from_pretrained(base)
            config = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=list(target_modules),
                use_rslora=use_rslora,
                rank_pattern=dict(rank_pattern or {}),
                alpha_pattern=dict(alpha_pattern or {}),
                fan_in_fan_out=fan_in_fan_out,
                lora_bias=lora_bias,
                modules_to_save=list(modules_to_save) or None,
                use_dora=use_dora,
            )
            peft_model = get_peft_model(model, config)
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for name, parameter in peft_model.named_parameters():
                    if ".lora_A." in name or ".lora_B." in name or ".lora_embedding_" in name:
                        noise = torch.randn(parameter.shape, generator=generator) * LORA_FACTOR_STD
                        parameter.copy_(noise)
                    elif ".modules_to_save." in name:  # "trained" full copies: the base plus noise
                        noise = torch.randn(parameter.shape, generator=generator) * LORA_FACTOR_STD
                        parameter.add_(noise)
                    elif ".lora_magnitude_vector." in name:  # DoRA: a "trained" magnitude, not ||W||
                        noise = torch.randn(parameter.shape, generator=generator) * LORA_FACTOR_STD
                        parameter.mul_(1 + noise)
            folder = tmp_path_factory.mktemp("adapter")
            peft_model.save_pretrained(str(folder))
            built[key] = folder
        return built[key]

    return build


@pytest.fixture(scope="session")
def lora_manifest() -> Callable[..., Any]:
    """Builder of the manifest ``push`` would make for an adapter on a base (see the module docstring)."""

    def build(adapter: Path, base: Path, *, with_tensors: bool = True) -> Any:
        from deltareg.client.fingerprint import fingerprint_path
        from deltareg.client.lora import read_peft_adapter
        from deltareg.client.manifest import BaseModelRef, FileEntry, Manifest

        read = read_peft_adapter(adapter)
        fingerprint = fingerprint_path(base, use_cache=False)
        touched = {t.base_tensor: fingerprint.tensors[t.base_tensor].digest for t in read.targets}
        files = [
            FileEntry(path=rel, digest=_file_digest(path), size=path.stat().st_size)
            for rel, path in ((rel, read.folder / rel) for rel in read.files)
        ]
        return Manifest(
            kind="lora",
            files=files,
            base=BaseModelRef(fingerprint=fingerprint.value, tensors=touched if with_tensors else {}),
            params=read.params(),
        )

    return build


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


@pytest.fixture
def copy_folder(tmp_path: Path) -> Callable[[Path], Path]:
    """Copy a folder into this test's tmp_path, to edit it without touching the cached original."""
    count = 0

    def copy(src: Path) -> Path:
        nonlocal count
        count += 1
        destination = tmp_path / f"copy{count}-{src.name}"
        shutil.copytree(src, destination)
        return destination

    return copy


# ======================================================================================================
# Production backends (helper "backends"): the real PostgreSQL server and moto's standalone S3 server.
#
# ``postgres_server`` (session): a PostgresServer that creates and drops databases on the PostgreSQL at
#     127.0.0.1:5432 (override with DELTAREG_TEST_POSTGRES_URL); ``pytest.fail`` when it is not reachable.
# ``postgres_database`` (function): the URL ``postgresql+psycopg://postgres@127.0.0.1:5432/<fresh db>`` of an
#     EMPTY database created for the test and dropped after it (connections still open are terminated).
# ``migrated_postgres_database`` (function): a database of the test's own with the registry schema at head
#     and no rows (a copy of a template migrated once per process, recycled between tests: emptied with
#     TRUNCATE, or dropped when the test changed its schema).
# ``moto_s3`` (session): a running ``moto.server.ThreadedMotoServer`` on a free loopback port, as a MotoS3
#     with ``.endpoint_url``, ``.make_bucket() -> name``, ``.client()`` (a boto3 client) and ``.server``.
#     AWS_ACCESS_KEY_ID=testing, AWS_SECRET_ACCESS_KEY=testing, AWS_DEFAULT_REGION=us-east-1 are set in
#     os.environ for the session, so server processes started by tests inherit them.
# ======================================================================================================

POSTGRES_URL = os.environ.get(
    "DELTAREG_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
MOTO_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
# Ambient AWS settings that would change which credentials or region boto3 uses.
AWS_ENV_TO_CLEAR = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
)


class PostgresServer:
    """The PostgreSQL server of the test run: makes databases (empty or migrated) and drops them.

    CREATE DATABASE costs ~0.4 s here (the copy is fsynced), too slow for every test of the matrix. So a
    migrated database given back by a test is recycled: its other connections are terminated and every
    table is emptied (TRUNCATE ... RESTART IDENTITY), unless the test changed its schema, in which case
    it is dropped. A test still never shares a database with another test running at the same time, and
    always starts from an empty schema at head.
    """

    def __init__(self, admin_url: str) -> None:
        from sqlalchemy import make_url

        self.admin_url = make_url(admin_url)
        self._template: str | None = None
        self._template_shape: list[tuple[Any, ...]] = []
        self._created: set[str] = set()
        self._recycled: list[str] = []

    def _connect(self, database: str | None = None) -> Any:
        import psycopg

        url = self.admin_url
        return psycopg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=database or url.database,
            autocommit=True,
            connect_timeout=10,
        )

    def _admin(self) -> Any:
        return self._connect()

    def url_of(self, name: str) -> str:
        """The SQLAlchemy URL of database ``name`` on this server."""
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def create_database(self, *, migrated: bool = False, name: str | None = None) -> str:
        """A new database (empty, or with the registry schema at head and no rows) and its URL.

        ``name`` creates it under that name (e.g. again, after a test dropped it).
        """
        if migrated and name is None and self._recycled:
            return self.url_of(self._recycled.pop())
        template = self._migrated_template() if migrated else None
        return self.url_of(self._create(template, name))

    def drop_database(self, url_or_name: str) -> None:
        """Drop a database, terminating connections still open to it (a test's server, say)."""
        name = self._name(url_or_name)
        with self._admin() as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self._created.discard(name)

    def give_back(self, url_or_name: str) -> None:
        """Return a migrated database after a test: emptied for the next test, or dropped."""
        name = self._name(url_or_name)
        try:
            with self._admin() as connection:
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
                )
            with self._connect(name) as connection:
                if self._shape(connection) != self._template_shape:
                    raise ValueError("the test changed the schema")
                tables = ", ".join(f'"{table}"' for table in self._tables(connection))
                connection.execute(f"TRUNCATE {tables} RESTART IDENTITY CASCADE")
        except Exception:
            self.drop_database(name)
            return
        self._recycled.append(name)

    @staticmethod
    def _name(url_or_name: str) -> str:
        from sqlalchemy import make_url

        return str(make_url(url_or_name).database if "://" in url_or_name else url_or_name)

    def _create(self, template: str | None, name: str | None = None) -> str:
        import uuid

        name = name or f"deltareg_t_{uuid.uuid4().hex[:16]}"
        with self._admin() as connection:
            connection.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        self._created.add(name)
        return name

    def _migrated_template(self) -> str:
        if self._template is None:
            from deltareg.registry.migrate import upgrade

            name = self._create(None)
            upgrade(self.url_of(name))  # once per process: every migrated database is a copy
            with self._connect(name) as connection:
                self._template_shape = self._shape(connection)
            self._template = name
        return self._template

    @staticmethod
    def _tables(connection: Any) -> list[str]:
        rows = connection.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'alembic_version'"
        ).fetchall()
        return sorted(name for (name,) in rows)

    @staticmethod
    def _shape(connection: Any) -> list[tuple[Any, ...]]:
        """Schema revision, columns, indexes and constraints: what a test must not have changed."""
        queries = (
            "SELECT version_num FROM alembic_version",
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = 'public'",
            "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE connamespace = 'public'::regnamespace",
        )
        return sorted(tuple(row) for query in queries for row in connection.execute(query).fetchall())

    def close(self) -> None:
        for name in sorted(self._created):
            self.drop_database(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The PostgreSQL server at DELTAREG_TEST_POSTGRES_URL; fails (never skips) when it is down."""
    server = PostgresServer(POSTGRES_URL)
    try:
        server._admin().close()
    except Exception as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {server.admin_url.render_as_string(hide_password=True)}: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Start it (.ci/run does: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start)",
            pytrace=False,
        )
    yield server
    server.close()


@pytest.fixture
def postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of an empty PostgreSQL database of this test's own (dropped after the test)."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)


@pytest.fixture
def migrated_postgres_database(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a PostgreSQL database of this test's own, with the registry schema at head."""
    url = postgres_server.create_database(migrated=True)
    yield url
    postgres_server.give_back(url)


class MotoS3:
    """moto's S3 server on loopback; each test makes buckets of its own."""

    def __init__(self, server: Any, endpoint_url: str) -> None:
        self.server = server
        self.endpoint_url = endpoint_url
        self._client: Any = None

    def client(self) -> Any:
        """A boto3 S3 client for this server (test credentials; one, shared: clients are thread-safe)."""
        if self._client is None:
            import boto3

            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                region_name=MOTO_ENV["AWS_DEFAULT_REGION"],
                aws_access_key_id=MOTO_ENV["AWS_ACCESS_KEY_ID"],
                aws_secret_access_key=MOTO_ENV["AWS_SECRET_ACCESS_KEY"],
            )
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name unless given) and return its name."""
        import uuid

        bucket = name or f"deltareg-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=bucket)
        return bucket


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    """moto's standalone S3 server over HTTP on a free loopback port, for the whole session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with pytest.MonkeyPatch.context() as patch:
        for name in AWS_ENV_TO_CLEAR:
            patch.delenv(name, raising=False)
        for name, value in MOTO_ENV.items():
            patch.setenv(name, value)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield MotoS3(server, f"http://{host}:{port}")
        finally:
            server.stop()
