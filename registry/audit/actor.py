"""Who is acting: the name every write records (audit log, alias history, evals, approvals).

It is the name of the API token the request carries (``deltareg.registry.auth``): an identity the server
checked, not one the client declares. A request without a token acts as ``anonymous`` (which can only
read, where anonymous reads are allowed, so no write records it).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from deltareg.registry.auth.principal import authenticate


def get_actor(request: Request) -> str:
    return authenticate(request).name


ActorDep = Annotated[str, Depends(get_actor)]
