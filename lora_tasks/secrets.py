"""Secrets in settings: which config keys hold one, and the forms in which a secret may be shown.
A webhook URL (its path or query is often the token) or a URL with credentials never reaches
MLflow params, logs or run-folder files whole: where shown it is redacted to its scheme and
host, where stored it is left out (the env var or Prefect Secret block supplies it again)."""

from __future__ import annotations

import copy
import re
from urllib.parse import urlsplit, urlunsplit

SECRET_KEYS = (("notifications", "webhook_url"),)
"""Config keys whose value is a secret (section, key)."""


def redact_url(url: str | None) -> str | None:
    """`https://hooks.example.com/…` for a URL with a path, query or credentials: where it goes, not
    the token. Never raises (it runs in failure hooks): a URL it cannot parse is `(redacted)`."""
    if not url:
        return url
    try:
        parts = urlsplit(str(url))
        host = parts.hostname + (f":{parts.port}" if parts.port else "") if parts.hostname else None
    except ValueError:  # a port out of range or not a number, a bad IPv6 literal, odd characters in the host
        return "(redacted)"
    if not parts.scheme or not host:
        return "(redacted)"
    secret = parts.username or parts.password or parts.path.strip("/") or parts.query or parts.fragment
    return f"{parts.scheme}://{host}/…(redacted)" if secret else url


def scrubbed(text: str, url: str) -> str:
    """`text` (an error about `url`) with the URL shown redacted, and any piece of it quoted
    there (`nonnumeric port: '…'`, a path in an invalid-URL error) that the redacted form does not show cut out."""
    shown = redact_url(url) or ""
    text = text.replace(url, shown)
    pieces = {p for p in re.split(r"[/?#@:;&=,\[\]\s\\]+", url) if len(p) >= 4 and p not in shown}
    for piece in sorted(pieces, key=len, reverse=True):
        text = text.replace(piece, "…")
    return text


def webhook_url_problem(url: str) -> str | None:
    """What keeps `url` from being a webhook URL, naming the fix (the URL shown redacted), or None."""
    how = "write it as https://HOST/PATH or https://HOST:PORT/PATH (PORT from 1 to 65535, an IPv6 HOST in square brackets)"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # its message may quote the host or port: not shown
        what = "port" if "Port" in str(exc) else "host"
        return f"cannot be read as a URL: its {what} is malformed (the URL is not shown: it may hold a token); {how}"
    if any(ch <= " " or ch == "\x7f" for ch in url):
        return f"holds a space or a control character: {redact_url(url)}; {how} (spaces written as %20)"
    if parts.scheme not in ("http", "https"):
        return f"must be an http:// or https:// URL, got {redact_url(url)}; {how}"
    if not parts.hostname or port == 0:
        return f"names {'no host' if not parts.hostname else 'port 0'}: {redact_url(url)}; {how}"
    return None


def without_credentials(url: str) -> str:
    """`url` with any `user:password@` taken out (a tracking URI turned into a link others see).
    Never raises: a URL it cannot parse is shown as is, or `(redacted)` where it may hold credentials."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    except ValueError:
        return "(redacted)" if "@" in url else url
    if not (parts.username or parts.password):
        return url
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redacted_config(config: dict, drop: bool = False) -> dict:
    """A copy of a dumped config with each secret redacted (to show: MLflow params), or, with
    `drop`, set to null (to store: registration.json)."""
    out = copy.deepcopy(config)
    for section, key in SECRET_KEYS:
        if (out.get(section) or {}).get(key):
            out[section][key] = None if drop else redact_url(out[section][key])
    return out
