"""Settings precedence (flag > env > file > default) and refusal of unsafe combinations."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from layerwatch_server.core.config import DEFAULT_DB_URL, load_settings


def test_defaults(monkeypatch):
    for var in ("LAYERWATCH_DB_URL", "LAYERWATCH_PORT", "LAYERWATCH_HOST", "LAYERWATCH_NO_AUTH"):
        monkeypatch.delenv(var, raising=False)
    s = load_settings()
    assert (s.db_url, s.host, s.port, s.no_auth) == (DEFAULT_DB_URL, "127.0.0.1", 8765, False)


@pytest.mark.parametrize("suffix", ["yaml", "toml"])
def test_precedence(tmp_path, monkeypatch, suffix):
    path = tmp_path / f"lw.{suffix}"
    text = 'port: 9000\nhost: "127.0.0.2"\nretention_days: 7\n'
    path.write_text(text if suffix == "yaml" else text.replace(": ", " = "))
    monkeypatch.delenv("LAYERWATCH_HOST", raising=False)
    monkeypatch.setenv("LAYERWATCH_PORT", "9001")
    s = load_settings(path)
    assert (s.port, s.host, s.retention_days) == (9001, "127.0.0.2", 7)  # env beats file
    assert load_settings(path, port=9002, host=None).port == 9002  # flag beats env; None = not given


def test_unknown_key_in_file_is_refused(tmp_path):
    path = tmp_path / "lw.yaml"
    path.write_text("prot: 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(path)


def test_no_auth_refused_on_public_host(monkeypatch):
    monkeypatch.delenv("LAYERWATCH_NO_AUTH", raising=False)
    with pytest.raises(ValidationError, match="force-no-auth"):
        load_settings(host="0.0.0.0", no_auth=True)
    assert load_settings(host="0.0.0.0", no_auth=True, force_no_auth=True).no_auth
    assert load_settings(host="localhost", no_auth=True).no_auth
