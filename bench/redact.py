"""Secrets out of every message and log line: :func:`redact` replaces credentials in text with ``***``.

What is replaced: the values passed in ``secrets`` (as written, URL-quoted and JSON-escaped) and those registered by
:func:`redact_logs`; the value (8 characters or more) of every environment variable whose name marks a credential
(``OPENAI_API_KEY``, ``HF_TOKEN``, ``PERSPECTIVE_API_KEY``, ``*_SECRET*``, ``*_PASSWORD``, ...; not ``*_PATH``,
``*_FILE``, ``*_URL``); ``Bearer`` credentials; the values of ``Authorization``, ``api-key``, ``x-api-key``,
``cookie`` headers (``Name: value``, ``"name": "value"``); ``key=``, ``api_key=``, ``token=``, ``access_token=``,
``sig=`` ... query parameters; ``user:password@`` in URLs; strings shaped like OpenAI (``sk-...``) or Hugging Face
(``hf_...``) keys.

:func:`redacted` turns an exception into a stand-in with redacted text and the original traceback, to chain
(``raise Clear(...) from redacted(err)``) so that a traceback never prints the original's text.
:func:`redact_logs` makes every log record of the process redacted (HTTP clients log response headers at DEBUG,
and a server may echo the request's there) and registers secrets that :func:`redact` then always replaces.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterable
from urllib.parse import quote

MASK = "***"
_REGISTERED: frozenset[str] = frozenset()  # secrets known to this process (a judge's API key, ...): always redacted
_INSTALL = threading.Lock()
MIN_ENV_SECRET = 8  # shorter values of credential-named variables are not treated as secrets (too many hits)
_SECRET_NAME = re.compile(r"(?:^|_)(?:API_?KEY|ACCESS_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)(?:_|$)", re.I)
_NOT_SECRET_NAME = re.compile(r"_(?:PATH|FILE|DIR|HOME|URL|ENDPOINT)$", re.I)  # HF_TOKEN_PATH names a file
_HEADERS = r"(?:proxy-)?authorization|x-api-key|api[-_]?key|x-goog-api-key|cookie|set-cookie"
_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # a header and its whole value: "Authorization: Bearer x", '"api-key": "x"', "'authorization': 'x'"
    (re.compile(rf"""(\b(?:{_HEADERS})["']?\s*[:=]\s*["']?)[^"'\\\r\n]+""", re.I), rf"\1{MASK}"),
    (re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]{4,}", re.I), rf"\1{MASK}"),
    (re.compile(r"([?&;](?:api[-_]?key|key|token|access[-_]?token|auth|sig|signature|password|secret)=)[^&\s\"'#]+",
                re.I), rf"\1{MASK}"),
    (re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s:@]+:[^/\s@]+@", re.I), rf"\1{MASK}@"),
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{16,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{20,}"), MASK),
]


def environment_secrets() -> list[str]:
    """Values of the environment variables whose names mark credentials (see the module docstring)."""
    return [v.strip() for k, v in os.environ.items()
            if _SECRET_NAME.search(k) and not _NOT_SECRET_NAME.search(k) and len(v.strip()) >= MIN_ENV_SECRET]


def _forms(secret: str) -> set[str]:
    """``secret`` as written, URL-quoted and JSON-escaped (how a server may echo it)."""
    return {secret, quote(secret, safe=""), json.dumps(secret)[1:-1]}


def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``str(text)`` with every secret (see the module docstring) replaced by ``***``."""
    out = str(text)
    known = (s.strip() for s in (*secrets, *_REGISTERED, *environment_secrets()) if s)
    values = {form for s in known if len(s) >= 4 for form in _forms(s)}
    for value in sorted(values, key=len, reverse=True):  # longest first: a secret containing another goes whole
        out = out.replace(value, MASK)
    for pattern, replacement in _PATTERNS:
        out = pattern.sub(replacement, out)
    return out


class RedactedError(Exception):
    """Stands in for an exception whose text may hold a secret: its type name and redacted text."""


def redacted(err: BaseException, secrets: Iterable[str | None] = ()) -> RedactedError:
    """A :class:`RedactedError` for ``err`` carrying ``err``'s traceback (frames only, never its text)."""
    return RedactedError(f"{type(err).__name__}: {redact(err, secrets)}").with_traceback(err.__traceback__)


def redact_logs(secrets: Iterable[str | None] = ()) -> None:
    """From now on, redact every log record's message and traceback (also replacing ``secrets``); idempotent."""
    global _REGISTERED
    with _INSTALL:
        _REGISTERED = _REGISTERED | {s.strip() for s in secrets if s and len(s.strip()) >= 4}
        make = logging.getLogRecordFactory()
        if getattr(make, "redacting", False):
            return

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = make(*args, **kwargs)
            try:
                record.msg, record.args = redact(record.getMessage()), ()
                if record.exc_info:
                    record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            except Exception:  # noqa: BLE001 - a malformed record is logging's to report, at emit time
                pass
            return record

        factory.redacting = True  # type: ignore[attr-defined]
        logging.setLogRecordFactory(factory)
