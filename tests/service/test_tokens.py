"""Tokens: stored as hashes only, scoped per project, revocable."""

from __future__ import annotations

import hashlib

from sqlalchemy import select

from layerwatch_server.storage import tokens
from layerwatch_server.storage.models import Token

from .batches import make_batch, post, unique


def test_only_the_hash_is_stored(engine):
    value = tokens.create_token(engine, unique(), "read")
    with engine.connect() as conn:
        stored = conn.scalars(select(Token.token_hash)).all()
    assert hashlib.sha256(value.encode()).hexdigest() in stored
    assert all(value not in row for row in stored)


def test_revoked_token_is_refused(client, engine):
    project = unique()
    value = tokens.create_token(engine, project, "write")
    assert post(client, make_batch("k", project=project), value).status_code == 202
    assert tokens.revoke_token(engine, value)
    assert post(client, make_batch("k", project=project), value).status_code == 401  # cache ttl is 0 here
    assert not tokens.revoke_token(engine, value)


def test_star_is_admin_only(engine):
    import pytest

    with pytest.raises(ValueError, match="admin"):
        tokens.create_token(engine, "*", "write")
    with pytest.raises(ValueError, match="scope"):
        tokens.create_token(engine, "p", "owner")
