"""JSON request bodies read with a size limit, before anything is parsed.

FastAPI's own body parameters read the whole body into memory first; these dependencies stop at the
limit instead (413) and turn parse errors into the stable ``invalid_input`` error.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from deltareg.client.errors import InvalidInput, PayloadTooLarge
from deltareg.registry.config import Settings
from deltareg.registry.deps import SettingsDep

Model = TypeVar("Model", bound=BaseModel)


# A JSON string can hold a NUL only as the escape \u0000 (a raw NUL byte is not valid JSON); an escape is
# one preceded by an odd number of backslashes. PostgreSQL text cannot store NUL, so it is refused here,
# for every JSON body at once, rather than failing deep in a write.
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


async def read_limited(request: Request, limit: int) -> bytes:
    """The JSON request body, refusing it (413) as soon as it is known to exceed ``limit`` bytes, and
    (400) when a string in it holds a NUL character."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLarge(f"request body is over the limit of {limit} bytes")
    if _NUL_ESCAPE.search(body):
        raise InvalidInput("invalid request body: text may not contain NUL characters (\\u0000)")
    return bytes(body)


def json_body(model: type[Model], limit: Callable[[Settings], int]) -> Callable[..., Awaitable[Model]]:
    """A dependency that reads a JSON body of at most ``limit(settings)`` bytes into ``model``."""

    async def dependency(request: Request, settings: SettingsDep) -> Model:
        raw = await read_limited(request, limit(settings))
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise InvalidInput(f"invalid request body: {describe_errors(exc.errors())}") from None

    return dependency


def describe_errors(errors: Any) -> str:
    """Pydantic/FastAPI validation errors as one short line: ``where: what; ...``."""
    parts = []
    for error in list(errors)[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "body"
        parts.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` documenting a body read by ``json_body`` (FastAPI cannot see it)."""
    schema = _inline_refs(model.model_json_schema())
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(definitions[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


async def raw_json_body(request: Request, settings: SettingsDep) -> bytes:
    """The request body, at most ``max_json_bytes``, for a route that parses it inside its write (so a
    malformed body is a refusal the route audits)."""
    return await read_limited(request, settings.max_json_bytes)


RawJsonBody = Annotated[bytes, Depends(raw_json_body)]
