"""Credentials never leave the process: strip them from URLs before anything is written.

`redact` removes the ``user:password@`` part of every URL in a string and blanks query
parameters that carry signatures or tokens (pre-signed URLs). It is applied to args.json,
tracker configs, log lines, error messages and the lease.
"""
from __future__ import annotations

import logging
import re
from typing import Any

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/?#@\s]*@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&](?:[^=&#\s]*(?:signature|token|secret|password|passwd|credential|sig|key)[^=&#\s]*)=)"
    r"[^&#\s]*", re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with credentials removed from every URL in it."""
    if "://" not in text:
        return text
    return _SECRET_PARAM.sub(r"\g<key>REDACTED", _USERINFO.sub(r"\g<scheme>", text))


def redact_values(data: Any) -> Any:
    """A copy of a JSON-like structure with every string redacted."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, dict):
        return {k: redact_values(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redact_values(v) for v in data)
    return data


class RedactFilter(logging.Filter):
    """A log handler filter that redacts every record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "://" in message:
            record.msg, record.args = redact(message), None
        return True
