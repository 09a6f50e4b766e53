"""Sending one delivery: the signed request, and what the receiver's answer counts as.

Signature scheme (documented in the README): ``X-Deltareg-Signature: sha256=<hex>`` where hex is
HMAC-SHA256 keyed with the webhook's secret over ``<X-Deltareg-Timestamp> + "." + <raw body>``. The
timestamp is the Unix time of the attempt, so a receiver can refuse old replays; the delivery id is the same
on every attempt, so it can drop repeats (delivery is at least once).
"""

from __future__ import annotations

import hashlib
import hmac
import time

import httpx

from deltareg.registry.webhooks.repository import Claimed, Outcome

USER_AGENT = "deltareg-webhooks/0.1"
EXCERPT_BYTES = 200  # of a failed answer's body, kept in the delivery log


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """``sha256=<hex>`` of HMAC-SHA256(``secret``, ``timestamp + "." + body``)."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def request_headers(claimed: Claimed, body: bytes, timestamp: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-Deltareg-Event": claimed.event,
        "X-Deltareg-Delivery": claimed.id,
        "X-Deltareg-Timestamp": timestamp,
        "X-Deltareg-Signature": signature(claimed.secret, timestamp, body),
    }


def make_http_client(timeout: float) -> httpx.AsyncClient:
    # Redirects are never followed: the receiver is the URL registered, not wherever it points to.
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False)


async def send(http: httpx.AsyncClient, claimed: Claimed) -> Outcome:
    """POST the delivery once; never raises for what the receiver (or the network) does."""
    body = claimed.payload.encode("utf-8")
    headers = request_headers(claimed, body, str(int(time.time())))
    try:
        async with http.stream("POST", claimed.url, content=body, headers=headers) as response:
            if response.is_success:
                return Outcome(response.status_code, None)
            excerpt = await _excerpt(response)
    except httpx.TimeoutException:
        return Outcome(None, f"no answer within {_timeout_of(http)} s")
    except httpx.HTTPError as exc:
        return Outcome(None, f"{type(exc).__name__}: {str(exc)[:EXCERPT_BYTES] or 'request failed'}")
    reason = f"HTTP {response.status_code} {response.reason_phrase}".strip()
    if response.is_redirect:
        location = response.headers.get("location", "")[:EXCERPT_BYTES]
        reason += f" (redirects are not followed; register the final URL: {location})"
    return Outcome(response.status_code, f"{reason}: {excerpt}" if excerpt else reason)


async def _excerpt(response: httpx.Response) -> str:
    """The start of the answer's body, as printable text; the rest is never read."""
    data = b""
    async for chunk in response.aiter_raw():
        data += chunk
        if len(data) >= EXCERPT_BYTES:
            break
    text = data[:EXCERPT_BYTES].decode("utf-8", errors="replace")
    return "".join(c if c.isprintable() else " " for c in text).strip()


def _timeout_of(http: httpx.AsyncClient) -> float | None:
    return http.timeout.read
