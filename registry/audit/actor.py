"""Who is acting: the name every write records (audit log, alias history, evals, approvals).

Until tokens land, the client declares it in the ``X-Deltareg-Actor`` header (``DELTAREG_ACTOR``, else the
local user name); without one the actor is ``anonymous``. It is an attribution, not authentication.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, Request

from deltareg.client.errors import InvalidInput

ACTOR_HEADER = "X-Deltareg-Actor"
ANONYMOUS = "anonymous"
# Printable, no control characters, no leading/trailing space; the length of models.ACTOR_LENGTH.
_ACTOR = re.compile(r"^[^\s\x00-\x1f\x7f](?:[^\x00-\x1f\x7f]{0,254}[^\s\x00-\x1f\x7f])?$")


def get_actor(request: Request) -> str:
    declared = request.headers.get(ACTOR_HEADER)
    if declared is None or declared == "":
        return ANONYMOUS
    if not _ACTOR.match(declared):
        raise InvalidInput(
            f"the {ACTOR_HEADER} header must be 1-256 printable characters without control characters"
        )
    return declared


ActorDep = Annotated[str, Depends(get_actor)]
