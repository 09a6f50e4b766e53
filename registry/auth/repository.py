from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from deltareg.registry.models import ApiToken


class TokenRepository:
    def __init__(self, session: Session) -> None:
        self.session = session

    def by_hash(self, token_hash: str) -> ApiToken | None:
        return self.session.scalars(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()

    def get(self, token_id: int) -> ApiToken | None:
        return self.session.get(ApiToken, token_id)

    def add(
        self,
        *,
        name: str,
        token_hash: str,
        scopes: list[str],
        namespaces: list[str],
        created_by: str,
        expires_at: datetime | None,
    ) -> ApiToken:
        token = ApiToken(
            name=name,
            token_hash=token_hash,
            scopes=",".join(sorted(scopes)),
            namespaces=",".join(namespaces),
            created_by=created_by,
            expires_at=expires_at,
        )
        self.session.add(token)
        self.session.flush()
        return token

    def all(self) -> list[ApiToken]:
        return list(self.session.scalars(select(ApiToken).order_by(ApiToken.id)))

    def any(self) -> bool:
        return self.session.scalars(select(ApiToken.id).limit(1)).first() is not None
