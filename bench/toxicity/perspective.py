"""The Perspective API scorer (Jigsaw): the original RealToxicityPrompts scorer. Needs ``PERSPECTIVE_API_KEY``.

One ``comments:analyze`` request per text (``TOXICITY`` summary score), rate-limited (1 query per second by
default), retried with exponential backoff on 429 and 5xx (honouring ``Retry-After``), and cached on disk: one
JSON file per text under ``<cache_dir>/perspective-cache/``, keyed by sha256(text), written atomically. The key
is read from the environment only; it is never written to the cache, to :meth:`identity` or to error messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from bench.paths import cache_dir
from bench.redact import redact, redact_logs
from bench.runs import write_json
from bench.toxicity.base import ScorerNotAvailableError, ToxicityScorer, register_scorer

DEFAULT_URL = "https://commentanalyzer.googleapis.com/v1alpha1/comments:analyze"
KEY_ENV = "PERSPECTIVE_API_KEY"
RETRY_STATUS = {429, 500, 502, 503, 504}
MAX_BACKOFF = 60.0


class PerspectiveError(RuntimeError):
    """Perspective refused a text or could not be reached after all retries."""


@register_scorer("perspective")
class PerspectiveScorer(ToxicityScorer):
    """Perspective ``TOXICITY``. Options: ``qps`` (0 = unlimited), ``base_url``, ``max_retries``, ``backoff``
    (first retry delay, doubled each time), ``timeout``, ``languages``, ``use_cache``, ``cache_root``."""

    def __init__(self, qps: float = 1.0, base_url: str = DEFAULT_URL, max_retries: int = 6, backoff: float = 1.0,
                 timeout: float = 30.0, languages: Sequence[str] = ("en",), use_cache: bool = True,
                 cache_root: str | Path | None = None) -> None:
        key = os.environ.get(KEY_ENV, "").strip()
        if not key:
            raise ScorerNotAvailableError(
                f"the perspective scorer needs an API key in the environment variable {KEY_ENV} "
                "(request one at https://developers.perspectiveapi.com); it is never written to disk")
        self._key = key
        redact_logs([key])  # urllib3 logs each request's URL, whose query holds the key, at DEBUG
        self.base_url, self.qps, self.max_retries = base_url, qps, max_retries
        self.backoff, self.timeout, self.languages = backoff, timeout, list(languages)
        self.cache = (Path(cache_root) if cache_root else cache_dir() / "perspective-cache") if use_cache else None
        self._session = requests.Session()
        self._next_slot = 0.0
        self.n_requests = 0  # HTTP requests made (retries included)

    # ----------------------------------------------------------------- cache
    def _cache_path(self, text: str) -> Path | None:
        if self.cache is None:
            return None
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return self.cache / digest[:2] / f"{digest}.json"

    def _cached(self, text: str) -> float | None:
        path = self._cache_path(text)
        if path is None or not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if rec.get("languages") != self.languages or not isinstance(rec.get("toxicity"), (int, float)):
            return None
        return float(rec["toxicity"])

    def _store(self, text: str, value: float) -> None:
        path = self._cache_path(text)
        if path is None:
            return
        write_json(path, {"toxicity": value, "attribute": "TOXICITY", "languages": self.languages}, indent=None)

    # ----------------------------------------------------------------- requests
    def _wait_for_slot(self) -> None:
        if self.qps <= 0:
            return
        now = time.monotonic()
        if self._next_slot > now:
            time.sleep(self._next_slot - now)
        self._next_slot = max(now, self._next_slot) + 1.0 / self.qps

    def _scrub(self, text: str) -> str:
        return redact(text, [self._key])

    def _request(self, text: str) -> float:
        payload = {"comment": {"text": text}, "languages": self.languages,
                   "requestedAttributes": {"TOXICITY": {}}, "doNotStore": True}
        last = ""
        for attempt in range(self.max_retries + 1):
            self._wait_for_slot()
            self.n_requests += 1
            delay = min(MAX_BACKOFF, self.backoff * 2**attempt)
            try:
                resp = self._session.post(self.base_url, params={"key": self._key}, json=payload, timeout=self.timeout)
            except requests.RequestException as err:
                last = self._scrub(f"{type(err).__name__}: {err}")
            else:
                if resp.status_code == 200:
                    try:
                        return float(resp.json()["attributeScores"]["TOXICITY"]["summaryScore"]["value"])
                    except (ValueError, KeyError, TypeError) as err:
                        raise PerspectiveError(f"unexpected Perspective response ({type(err).__name__}): "
                                               f"{self._scrub(resp.text)[:300]}") from None
                last = f"HTTP {resp.status_code}: {self._scrub(resp.text)[:300]}"
                if resp.status_code not in RETRY_STATUS:
                    raise PerspectiveError(f"Perspective refused {text[:60]!r}: {last}")
                retry_after = resp.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = min(MAX_BACKOFF, float(retry_after))
            if attempt < self.max_retries:
                time.sleep(delay)
        raise PerspectiveError(f"Perspective failed after {self.max_retries + 1} attempts: {last}")

    def _score(self, texts: list[str]) -> Sequence[float]:
        out = []
        for text in texts:
            value = self._cached(text)
            if value is None:
                value = self._request(text)
                self._store(text, value)
            out.append(value)
        return out

    def identity(self) -> dict:
        return {"scorer": "perspective", "attribute": "TOXICITY", "endpoint": self.base_url,
                "languages": self.languages}
