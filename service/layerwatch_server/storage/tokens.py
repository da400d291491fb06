"""API tokens: created once and shown once, stored as SHA-256 only, looked up by hash (and cached briefly)."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

from sqlalchemy import Engine, insert, select, update

from layerwatch_server.storage.base import utcnow
from layerwatch_server.storage.engine import writer
from layerwatch_server.storage.models import ALL_PROJECTS, SCOPES, Token

PREFIX = "lw_"


@dataclass(frozen=True)
class Grant:
    """What a token allows: a scope on one project (or on every project for ``*``)."""

    project: str
    scope: str

    def allows(self, project: str, need: str) -> bool:
        if self.project not in (project, ALL_PROJECTS):
            return False
        return self.scope == "admin" or self.scope == need


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(engine: Engine, project: str, scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}")
    if project == ALL_PROJECTS and scope != "admin":
        raise ValueError("only an admin token can cover every project ('*')")
    token = PREFIX + secrets.token_urlsafe(32)
    with writer(engine).begin() as conn:
        conn.execute(
            insert(Token).values(project=project, scope=scope, token_hash=hash_token(token), created_at=utcnow())
        )
    return token


def revoke_token(engine: Engine, token: str) -> bool:
    with writer(engine).begin() as conn:
        res = conn.execute(
            update(Token)
            .where(Token.token_hash == hash_token(token), Token.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
    return res.rowcount > 0


def lookup(engine: Engine, token: str) -> Grant | None:
    with engine.connect() as conn:
        row = conn.execute(
            select(Token.project, Token.scope).where(Token.token_hash == hash_token(token), Token.revoked_at.is_(None))
        ).first()
    return Grant(row.project, row.scope) if row else None


class TokenCache:
    """Verified tokens (and unknown ones) remembered briefly, so ingest does not hit the DB per request."""

    def __init__(self, engine: Engine, ttl_s: float, size: int = 4096) -> None:
        self.engine, self.ttl_s, self.size = engine, ttl_s, size
        self._entries: OrderedDict[str, tuple[float, Grant | None]] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, token: str) -> tuple[bool, Grant | None]:
        """(True, grant) when a fresh answer is in memory; (False, None) when the DB must be asked."""
        with self._lock:
            hit = self._entries.get(hash_token(token))
        if hit is not None and hit[0] > time.monotonic():
            return True, hit[1]
        return False, None

    def resolve(self, token: str) -> Grant | None:
        found, grant = self.cached(token)
        if found:
            return grant
        key, now = hash_token(token), time.monotonic()
        grant = lookup(self.engine, token)
        with self._lock:
            self._entries[key] = (now + self.ttl_s, grant)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return grant
