"""The HTTP layer: one place that turns responses into typed errors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from deltareg.client.errors import ConnectionFailed, DeltaregError, error_for

USER_AGENT = "deltareg-client/0.1"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)


def make_client(url: str, token: str | None, *, timeout: httpx.Timeout = DEFAULT_TIMEOUT) -> httpx.Client:
    headers = {"User-Agent": USER_AGENT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(base_url=url, headers=headers, timeout=timeout, follow_redirects=False)


def raise_for_status(response: httpx.Response) -> None:
    """Raise the deltareg error the server named, or a generic one for a non-deltareg failure."""
    if response.is_success:
        return
    code, detail = "", ""
    try:
        response.read()
        body = response.json()
        if isinstance(body, dict):
            code, detail = str(body.get("error", "")), str(body.get("detail", ""))
    except (ValueError, httpx.ResponseNotRead):
        pass
    if not detail:
        detail = f"{response.status_code} {response.reason_phrase} from {response.request.url}"
    raise error_for(code, response.status_code, detail)


@contextmanager
def translate_transport_errors(url: str) -> Iterator[None]:
    """Name the server when it cannot be reached, instead of a transport traceback."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ConnectionFailed(
            f"the registry at {url} did not answer in time ({type(exc).__name__})"
        ) from exc
    except httpx.TransportError as exc:
        raise ConnectionFailed(f"cannot reach the registry at {url}: {exc}") from exc


def request_json(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    with translate_transport_errors(str(client.base_url)):
        response = client.request(method, path, **kwargs)
    raise_for_status(response)
    try:
        return response.json()
    except ValueError as exc:
        raise DeltaregError(f"the registry sent a response that is not JSON for {method} {path}") from exc
