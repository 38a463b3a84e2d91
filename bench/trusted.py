"""Pickled caches are unpickled only when this installation wrote them.

The embedded judge and the embedded toxicity scorer are scikit-learn objects saved with joblib, and unpickling a
file runs whatever code it names. So every such file gets an HMAC-SHA256 signature (``<file>.sig``) under a key kept
outside the cache folder: ``$BENCH_KEY_FILE``, else ``~/.config/florain-bench/cache.key`` (created on first use,
readable by its owner only). A file planted in the cache, or a cache folder copied from another machine or user,
fails the check and is never loaded; the callers retrain (both instruments are trained from the data here).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Any

import joblib

SUFFIX = ".sig"


class UntrustedCacheError(RuntimeError):
    """A cached file whose signature is missing or wrong: it was not written by this installation."""


def key_file() -> Path:
    """Where the signing key lives (never inside the cache folder it protects)."""
    env = os.environ.get("BENCH_KEY_FILE")
    return Path(env) if env else Path.home() / ".config" / "florain-bench" / "cache.key"


def _key() -> bytes:
    path = key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # atomic and never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def signature(path: Path) -> str:
    """The file's HMAC-SHA256 under this installation's key."""
    mac = hmac.new(_key(), digestmod=hashlib.sha256)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def dump(obj: Any, path: Path, **kwargs: Any) -> None:
    """``joblib.dump`` and sign the file."""
    joblib.dump(obj, path, **kwargs)
    Path(str(path) + SUFFIX).write_text(signature(path))


def verify(path: Path) -> None:
    """Raise :class:`UntrustedCacheError` unless ``path`` carries this installation's signature."""
    sig = Path(str(path) + SUFFIX)
    recorded = sig.read_text().strip() if sig.is_file() else ""
    if not recorded or not hmac.compare_digest(recorded, signature(path)):
        why = "has no signature" if not recorded else "does not match its signature"
        raise UntrustedCacheError(
            f"{path} {why}: it was not written by this installation of bench (a file planted in the cache, or a "
            f"cache folder copied from elsewhere), and unpickling it could run code, so it was not loaded. Delete "
            f"{Path(path).parent} and retrain (`bench judge train`, `bench toxicity train`); the key is {key_file()}")


def refusal(path: Path) -> str | None:
    """Why ``path`` may not be unpickled (None: it carries this installation's signature)."""
    try:
        verify(path)
    except (UntrustedCacheError, FileNotFoundError) as err:
        return f"holds a file this installation did not write, which is never unpickled ({err})"
    return None


def load(path: Path) -> Any:
    """``joblib.load`` of a file this installation signed; anything else is refused before it is read."""
    verify(path)
    return joblib.load(path)
