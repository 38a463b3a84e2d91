"""Toxicity data: evaluation prompts, Perspective-scored texts (scorer training/validation), steering texts.

Files are found by :func:`bench.data.toxicity.find_toxicity_file` (``--data-dir`` or ``$BENCH_DATA_DIR``);
the challenging prompts fall back to the Hugging Face Hub (``allenai/real-toxicity-prompts``) for online users.
Every malformed line raises with its file and line number.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.data.jsonl import read_jsonl
from bench.data.toxicity import find_toxicity_file, prompt_text
from bench.data.truthfulqa import DataNotFoundError

log = logging.getLogger(__name__)

HUB_ID = "allenai/real-toxicity-prompts"
PROMPT_SETS = ("challenging", "toxic", "nontoxic")
# RTP prompt records (rtp_toxic_5k + rtp_nontoxic_5k) are dealt once, by a fixed hash of the normalised prompt text
# (no seed), into a steering part (``--steer-data rtp`` fits on it) and a scorer part (the embedded scorer trains
# and is checked on it), so no text ever both steers and trains the scorer.
STEERING_FRACTION = 0.2


@dataclass(frozen=True)
class ToxicityPrompt:
    """One evaluation prompt: a stable id, its text and its Perspective toxicity (``None`` when unknown)."""

    id: str
    text: str
    toxicity: float | None


@dataclass(frozen=True)
class ScoredText:
    """A text with its Perspective toxicity. ``group``: the prompt it belongs to (held-out splits never cut a group)."""

    text: str
    toxicity: float
    group: str
    source: str  # "prompt" (an RTP prompt), "generation" (GPT-2) or "human" (the RTP continuation)


@dataclass(frozen=True)
class SteeringGroup:
    """Continuations of one prompt split by Perspective toxicity: desirable (< 0.5) and undesirable (>= 0.5)."""

    prompt: str
    desirable: tuple[str, ...]
    undesirable: tuple[str, ...]


def normalise(text: str) -> str:
    """The form prompts are compared in: whitespace collapsed and stripped."""
    return re.sub(r"\s+", " ", text).strip()


def rtp_part(text: str) -> str:
    """``"steering"`` or ``"scorer"``: the part an RTP prompt record belongs to (:data:`STEERING_FRACTION`)."""
    digest = hashlib.sha256(f"rtp-part:{normalise(text)}".encode()).hexdigest()
    return "steering" if int(digest[:12], 16) / 16**12 < STEERING_FRACTION else "scorer"


def _score(value: object, where: str, field: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {field} must be a number or null, got {value!r}")
    return float(value)


def _prompt_score(rec: dict, where: str) -> float | None:
    if isinstance(rec.get("prompt"), dict):
        return _score(rec["prompt"].get("toxicity"), where, "prompt.toxicity")
    return _score(rec.get("score"), where, "score")


def _from_hub(name: str) -> list[ToxicityPrompt]:
    from datasets import load_dataset

    ds = load_dataset(HUB_ID, split="train")
    out = []
    for i, rec in enumerate(ds):
        if name == "challenging" and rec.get("challenging"):
            out.append(ToxicityPrompt(f"hub:{i}", rec["prompt"]["text"], rec["prompt"].get("toxicity")))
    return out


def load_toxicity_prompts(name: str = "challenging", data_dir: str | Path | None = None, limit: int | None = None,
                          use_hub: bool = True) -> tuple[list[ToxicityPrompt], str]:
    """Evaluation prompts in file order and where they came from.

    ``name``: ``challenging`` (1,196 prompts, the default), ``toxic`` / ``nontoxic`` (5,000 each), or a JSONL path.
    Ids are ``<name>:<line>``. Only ``challenging`` falls back to the Hub (records flagged ``challenging``;
    the Hub's set may differ slightly from the file's).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    try:
        path = find_toxicity_file(name, data_dir)
    except DataNotFoundError as err:
        if not use_hub or name != "challenging":
            raise
        log.warning("%s; trying the Hugging Face Hub (%s, challenging prompts)", err, HUB_ID)
        try:
            prompts = _from_hub(name)
        except Exception as hub_err:  # noqa: BLE001 - any Hub failure is reported with the file lookup
            raise DataNotFoundError(f"{err}\nHugging Face Hub {HUB_ID}: {type(hub_err).__name__}: "
                                    f"{str(hub_err)[:200]}") from None
        return prompts[:limit], f"hub:{HUB_ID}"
    label = name if name in PROMPT_SETS else Path(name).stem
    prompts = []
    for n, rec in read_jsonl(path):
        where = f"{path}, line {n}"
        prompts.append(ToxicityPrompt(f"{label}:{n}", prompt_text(rec, where), _prompt_score(rec, where)))
        if limit is not None and len(prompts) >= limit:
            break
    return prompts, str(path)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _generations(rec: dict, where: str) -> list[dict]:
    gens = rec.get("generations")
    if not isinstance(gens, list) or not all(isinstance(g, dict) and isinstance(g.get("text"), str) for g in gens):
        raise ValueError(f"{where}: expected \"generations\": a list of {{\"text\": ..., \"toxicity\": ...}}")
    return gens


def load_scored_texts(data_dir: str | Path | None = None) -> tuple[list[ScoredText], dict]:
    """Perspective-scored texts for training/validating a scorer, and the files used (path, sha256, records).

    The RTP prompts of ``rtp_toxic_5k`` and ``rtp_nontoxic_5k`` (``prompt.toxicity``), and from
    ``prompted_gens_gpt2`` each prompt's 25 GPT-2 generations and its human continuation; texts without a
    score are skipped. Each text's group is its (normalised) prompt.
    """
    items: list[ScoredText] = []
    files: dict[str, dict] = {}
    for name in ("toxic", "nontoxic", "gpt2-gens"):
        path = find_toxicity_file(name, data_dir)
        n_records = 0
        for n, rec in read_jsonl(path):
            where = f"{path}, line {n}"
            n_records += 1
            prompt = prompt_text(rec, where)
            group = normalise(prompt)
            if name != "gpt2-gens":
                tox = _prompt_score(rec, where)
                if tox is not None:
                    items.append(ScoredText(prompt, tox, group, "prompt"))
                continue
            cont = rec.get("continuation")
            if isinstance(cont, dict) and isinstance(cont.get("text"), str):
                tox = _score(cont.get("toxicity"), where, "continuation.toxicity")
                if tox is not None:
                    items.append(ScoredText(cont["text"], tox, group, "human"))
            for g in _generations(rec, where):
                tox = _score(g.get("toxicity"), where, "generations[].toxicity")
                if tox is not None:
                    items.append(ScoredText(g["text"], tox, group, "generation"))
        files[name] = {"path": str(path), "sha256": file_sha256(path), "records": n_records}
    return items, files


def load_steering_groups(data_dir: str | Path | None = None, threshold: float = 0.5) -> list[SteeringGroup]:
    """Per prompt of ``prompted_gens_gpt2``: its GPT-2 continuations split at Perspective ``toxicity`` = threshold.

    Unscored generations are skipped. Many prompts have no undesirable continuation (31 of 2,497 are toxic).
    """
    path = find_toxicity_file("gpt2-gens", data_dir)
    groups = []
    for n, rec in read_jsonl(path):
        where = f"{path}, line {n}"
        good, bad = [], []
        for g in _generations(rec, where):
            tox = _score(g.get("toxicity"), where, "generations[].toxicity")
            if tox is not None:
                (bad if tox >= threshold else good).append(g["text"])
        groups.append(SteeringGroup(prompt_text(rec, where), tuple(good), tuple(bad)))
    return groups


def exclude_prompts(groups: Sequence[SteeringGroup], eval_prompts: Iterable[str | ToxicityPrompt]) -> list[SteeringGroup]:
    """The groups whose prompt is not among ``eval_prompts`` (compared after :func:`normalise`)."""
    banned = {normalise(p.text if isinstance(p, ToxicityPrompt) else p) for p in eval_prompts}
    return [g for g in groups if normalise(g.prompt) not in banned]
