"""The Hugging Face Hub's offline switches, its local cache and a fast reachability probe.

``HF_HUB_OFFLINE`` (and ``HF_DATASETS_OFFLINE`` / ``TRANSFORMERS_OFFLINE``) set to 1/true/yes/on means: never ask the
Hub, use only the local cache. The probe exists because ``huggingface_hub``'s downloads retry a failed first request
5 times (1+2+4+8+8 s, hard-coded in ``hf_hub_download`` when no local copy exists: no environment variable or
parameter lowers it), so an optional download on a machine without network costs ~25 s before it fails; one
metadata request (``HfApi.*_info``, which never retries) answers the same question in one round trip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from bench.redact import redact

#: Variables that switch the Hub off for datasets; models (huggingface_hub, transformers) honour the first and last.
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
MODEL_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
TRUE_VALUES = ("1", "true", "yes", "on")


def offline_variable(names: Sequence[str] = OFFLINE_VARIABLES) -> str | None:
    """The first of ``names`` set to a true value (1/true/yes/on, any case), or None."""
    return next((n for n in names if os.environ.get(n, "").strip().lower() in TRUE_VALUES), None)


def hub_offline(names: Sequence[str] = OFFLINE_VARIABLES) -> bool:
    """Whether an offline variable (default: any of :data:`OFFLINE_VARIABLES`) is set to a true value."""
    return offline_variable(names) is not None


def cached(repo: str, filename: str, repo_type: str = "model") -> bool:
    """Whether ``filename`` of ``repo`` is in the local Hugging Face Hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo, filename, repo_type=repo_type), str)


def hub_unreachable(repo: str, repo_type: str = "model", timeout: float = 10.0,
                    endpoint: str | None = None) -> str | None:
    """None when the Hub answers about ``repo`` now, else why not: one request, no retries."""
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=endpoint).repo_info(repo, repo_type=repo_type, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - any failure means "not now"
        first = (str(err).strip().splitlines() or [""])[0][:160]
        return redact(f"{type(err).__name__}: {first}")
    return None
