"""What a method may use to fit one fold (:class:`FitContext`: model, questions, fold, layer, site, options) and
helpers shared by method modules."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from baselines.shift import AdditiveShift
from bench.capture import cache_key, capture, qa_text
from bench.data.truthfulqa import Fold, Question
from bench.models import LoadedModel
from bench.paths import activation_cache_dir
from bench.probes import head_probe_accuracies
from bench.runs import config_hash


@dataclass
class FitContext:
    """What a method may use to fit: the model, all loaded questions, one fold, the site and layer, options."""

    lm: LoadedModel
    questions: list[Question]
    fold: Fold
    layer: int
    site: str = "heads"
    options: Any = field(default_factory=dict)  # the method's options: its dataclass, or a dict Method.fit checks
    data_checksum: str = ""
    capture_batch_size: int = 32
    text_format: str = "qa"  # "qa": "Q: {question} A: {answer}"; "continuation": question + answer (a prompt's continuation)
    seed: int = 42  # the run's --seed: every seeded choice of a fit (probes, pairs, initialisation, shuffling)
    compile: bool = False  # the run's --compile: torch.compile a fit's training step where the method has one

    def qa_pairs(self) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Capture texts of every loaded question's answers, labels (1 = correct) and question ids."""
        if self.text_format not in ("qa", "continuation"):
            raise ValueError(f"unknown text format {self.text_format!r}; valid: qa, continuation")
        texts, labels, groups = [], [], []
        for q in self.questions:
            for ans, lab in [(a, 1) for a in q.correct] + [(a, 0) for a in q.incorrect]:
                texts.append(qa_text(q.question, ans) if self.text_format == "qa" else q.question + ans)
                labels.append(lab)
                groups.append(q.index)
        return texts, torch.tensor(labels), torch.tensor(groups)

    def activations(self, layers: list[int] | None = None, site: str | None = None
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
        """``({layer: acts [N, H, D]}, labels [N], question ids [N])`` for all loaded questions (cached on disk).

        Defaults: the context's layer and site.
        """
        texts, labels, groups = self.qa_pairs()
        acts = capture(self.lm, texts, layers or [self.layer], site or self.site, batch_size=self.capture_batch_size)
        return acts, labels, groups

    def split(self, groups: torch.Tensor, which: str) -> torch.Tensor:
        ids = torch.tensor([self.questions[i].index for i in getattr(self.fold, which)], dtype=groups.dtype)
        return torch.isin(groups, ids)

    def probe_scores(self, layers: list[int], seed: int = 42, score: str = "accuracy") -> np.ndarray:
        """``[len(layers), heads]`` validation scores of one logistic probe per head, trained on the fold's
        training questions and scored on its validation questions (never its test questions).

        Cached per layer on disk beside the activations, keyed by the capture (model, dtype, site, texts), the
        labels, the split, the seed and the score, so ITI's head ranking and the layer rule share one fit."""
        acts, labels, groups = self.activations(layers)
        tr, va = self.split(groups, "train"), self.split(groups, "val")
        texts = self.qa_pairs()[0]
        root = activation_cache_dir() / "probes"
        out = []
        for layer in layers:
            key = config_hash({"capture": cache_key(self.lm.identity, str(self.lm.model.dtype), self.site, layer, texts),
                               "labels": labels.tolist(), "train": tr.tolist(), "val": va.tolist(), "seed": seed,
                               "score": score})
            path = root / f"{key}.npy"
            if path.is_file():
                out.append(np.load(path))
                continue
            scores = head_probe_accuracies(acts[layer][tr], labels[tr], acts[layer][va], labels[va], seed, score)
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: concurrent runs
            with tmp.open("wb") as fh:
                np.save(fh, scores)
            tmp.replace(path)
            out.append(scores)
        return np.stack(out)

    def layer_probe_scores(self, seed: int = 42) -> np.ndarray:
        """``[layers, heads]`` probe accuracies of every layer (:meth:`probe_scores`): the released layer rule's input."""
        return self.probe_scores(list(range(self.lm.spec.n_layers)), seed)


def probe_layer(scores: np.ndarray) -> int:
    """The released FLORAIN code's layer rule: the layer whose heads' probes reach the best mean accuracy."""
    return int(np.argmax(scores.mean(1)))


def shape_config(acts: torch.Tensor, ctx: FitContext) -> dict:
    return {"heads": acts.shape[1], "head_dim": acts.shape[2], "model": ctx.lm.identity,
            "data_checksum": ctx.data_checksum, "fold": ctx.fold.fold}


def build_shift(config: dict, tensors: dict[str, torch.Tensor]) -> AdditiveShift:
    """An additive shift's module from its saved tensors (every shift method's ``build``)."""
    return AdditiveShift(torch.zeros_like(tensors["shift"]))
