"""What notify reads from the alerting file: its channels, the routes to them, and delivery timing.

The file itself (``rules_file``) is read by ``api.alerting``, which adds the rules' own sections.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Channel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["webhook", "slack", "alertmanager", "email"]
    url: str | None = None  # webhook, slack, alertmanager (base URL)
    headers: dict[str, str] = {}
    timeout_s: float = Field(5.0, gt=0)
    host: str | None = None  # email
    port: int = 25
    sender: str = "layerwatch@localhost"
    to: list[str] = []
    starttls: bool = False
    username: str | None = None
    password: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> Channel:
        if self.type == "email":
            if not self.host:
                raise ValueError("host: an email channel needs the SMTP server's host")
            if not self.to:
                raise ValueError("to: an email channel needs at least one recipient")
        elif not self.url:
            raise ValueError(f"url: a {self.type} channel needs a url")
        return self


class Route(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: list[str]
    projects: list[str] = ["*"]  # fnmatch patterns
    severities: list[Literal["info", "warning", "critical"]] = ["info", "warning", "critical"]


class Notify(BaseModel):
    model_config = ConfigDict(extra="forbid")
    renotify_s: float = Field(4 * 3600.0, gt=0, description="re-send a still-firing alert this often")
    max_backoff_s: float = Field(60.0, gt=0, description="longest wait between delivery retries")
    give_up_s: float = Field(24 * 3600.0, gt=0, description="mark failed after retrying this long")
    mlflow_ui_url: str | None = None
    public_url: str | None = Field(None, description="this collector's URL, for links in notifications")
    resolved_visible_s: float = Field(600.0, ge=0, description="resolved alerts stay in ingest responses")


class NotifyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: dict[str, Channel] = {}
    routes: list[Route] = []
    notify: Notify = Notify()

    def channels_for(self, project: str, severity: str) -> list[str]:
        """Channel names for an alert; with no routes, every channel gets everything."""
        if not self.routes:
            return sorted(self.channels)
        names: list[str] = []
        for route in self.routes:
            if severity in route.severities and any(fnmatch.fnmatchcase(project, p) for p in route.projects):
                names += [c for c in route.channels if c not in names]
        return names

    def unknown_channel(self) -> str | None:
        """The first route naming a channel that is not defined, as an error message (None: all defined)."""
        for i, route in enumerate(self.routes):
            for c in route.channels:
                if c not in self.channels:
                    return f"routes[{i}].channels: unknown channel {c!r}; define it under channels"
        return None
