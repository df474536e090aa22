"""Secrets in settings: which config keys hold one, and the forms in which a secret may be shown.
A webhook URL (its path or query is often the token) or a URL with credentials never reaches
MLflow params, logs or run-folder files whole: where shown it is redacted to its scheme and
host, where stored it is left out (the env var or Prefect Secret block supplies it again)."""

from __future__ import annotations

import copy
from urllib.parse import urlsplit, urlunsplit

SECRET_KEYS = (("notifications", "webhook_url"),)
"""Config keys whose value is a secret (section, key)."""


def redact_url(url: str | None) -> str | None:
    """`https://hooks.example.com/…` for a URL with a path, query or credentials: where it goes, not the token."""
    if not url:
        return url
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        return "(redacted)"
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    secret = parts.username or parts.password or parts.path.strip("/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}/…(redacted)" if secret else url


def without_credentials(url: str) -> str:
    """`url` with any `user:password@` taken out (a tracking URI turned into a link others see)."""
    parts = urlsplit(url)
    if not (parts.username or parts.password):
        return url
    host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redacted_config(config: dict, drop: bool = False) -> dict:
    """A copy of a dumped config with each secret redacted (to show: MLflow params), or, with
    `drop`, set to null (to store: registration.json)."""
    out = copy.deepcopy(config)
    for section, key in SECRET_KEYS:
        if (out.get(section) or {}).get(key):
            out[section][key] = None if drop else redact_url(out[section][key])
    return out
