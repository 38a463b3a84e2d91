"""Does a frozen LM's view of the answer help the embedded TruthfulQA judge (``embedded-v2``)?

Measures, for each aspect (truth, info) under the judge's two validation protocols (``deployment``: answer-level
5-fold; ``new-questions``: question-grouped 5-fold; seed 0, the splits of :func:`bench.judges.validate.splits`):

1. ``baseline``  – the current judge (:func:`bench.judges.embedded.fit_aspect`), recomputed on the same rows;
2. ``lm_only``   – a standardised logistic regression on smollm2-135m features alone (C chosen on an inner split
   of the training part);
3. ``stacked``   – the judge's booster given one more static feature: the LM model's probability, out-of-fold on the
   training part (inner 5-fold), from the model fitted on the whole training part on the test part;
4. ``averaged``  – ``w · p_judge + (1 − w) · p_lm`` with ``w`` chosen on an inner 80/20 split of the training part.

Scores: :func:`bench.judges.validate.agreement` on model-written answers (references excluded) and the share of the
774 real broken answers (:func:`bench.judges.validate._real_broken`, assigned to folds by
:func:`bench.judges.validate._broken_in_fold`) called positive. Synthetic corruptions are scored for the baseline
only (their LM features would cost another extraction per fold).

LM features (one forward pass per text, fp32 CPU, one thread): ``"Q: {question}\\nA: {answer}"``; the question
prefix is run once per question and its key/value cache reused for that question's answers (same text, the answer
tokenised after the prefix); the answer is truncated to ``MAX_ANSWER_TOKENS``. Kept per pair: mean-pooled hidden
states over the answer tokens at ``LAYERS``, the last answer token's state at ``LAST_LAYERS``, and NLL statistics
(mean, max, first token, count). Cached (``np.savez``) under ``$BENCH_CACHE_DIR/judge-lm-features`` (default
``~/.cache/bench/judge-lm-features``) keyed by the hash of the pair list and settings. The logistic regression sees
a label-free PCA of the standardised hidden states (fitted on all cached pairs, as the judge's TF-IDF is fitted on
all texts) plus the NLL statistics.

Run: ``.venv/bin/python results/generation/judge_lm_features.py`` (``--sample N``: N seeded pairs per aspect for a
quick run, written to the temp dir unless ``--out PATH``;
the features of a cached full extraction are reused). Data: ``--data-dir``, else where the harness looks (``BENCH_DATA_DIR`` first).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.model_selection import GroupKFold, GroupShuffleSplit, KFold, ShuffleSplit  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402

from bench.judges.base import THRESHOLD  # noqa: E402
from bench.judges.degenerate import corruptions  # noqa: E402
from bench.judges.embedded import (  # noqa: E402
    NEGATIVES_PER_ANSWER,
    AnswerClassifier,
    Example,
    Featurizer,
    Rows,
    _refs,
    dedup_labels,
    fit_aspect,
    label_corpus,
    negatives_for,
)
from bench.judges.validate import (  # noqa: E402
    PROTOCOLS,
    _broken_in_fold,
    _broken_rates,
    _real_broken,
    _reference_mask,
    _scores,
    splits,
)

MODEL = "smollm2-135m"
LAYERS = (10, 20, 30)          # hidden_states indices (0 = embeddings, 30 = last layer, after the final norm)
LAST_LAYERS = (20, 30)
MAX_ANSWER_TOKENS = 40
CHUNK = 16                     # answers of one question per forward pass
PCA_DIM = 256
C_GRID = (0.003, 0.03, 0.3)
FOLDS, SEED = 5, 0
VARIANTS = ("baseline", "lm_only", "stacked", "averaged")
W_GRID = tuple(np.round(np.linspace(0, 1, 11), 2))


# ---------------------------------------------------------------- LM features

def feature_cache_dir() -> Path:
    root = Path(os.environ.get("BENCH_CACHE_DIR", Path.home() / ".cache" / "bench"))
    return root / "judge-lm-features"


def pairs_key(pairs: Sequence[tuple[str, str]]) -> str:
    h = hashlib.sha256(json.dumps([MODEL, LAYERS, LAST_LAYERS, MAX_ANSWER_TOKENS, list(pairs)]).encode())
    return h.hexdigest()[:16]


def _answer_ids(tok, answer: str) -> list[int]:
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"][:MAX_ANSWER_TOKENS]
    return ids or tok("\n", add_special_tokens=False)["input_ids"]


def _chunk_features(lm, prefix, prefix_logits, answers: list[list[int]]) -> tuple[np.ndarray, ...]:
    """One forward pass over a chunk of answers to one question, reusing the question's cache ``prefix``."""
    import torch

    b, width = len(answers), max(len(a) for a in answers)
    ids = torch.zeros((b, width), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for i, a in enumerate(answers):
        ids[i, :len(a)], mask[i, :len(a)] = torch.tensor(a), 1
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(b)
    full_mask = torch.cat([torch.ones((b, prefix.get_seq_length()), dtype=torch.long), mask], 1)
    out = lm.model.model(input_ids=ids, attention_mask=full_mask, past_key_values=cache, use_cache=True,
                         output_hidden_states=True)
    hs, m = out.hidden_states, mask.unsqueeze(-1).float()
    mean = torch.stack([(hs[layer] * m).sum(1) / m.sum(1) for layer in LAYERS], 1)
    last_pos = mask.sum(1) - 1
    last = torch.stack([hs[layer][torch.arange(b), last_pos] for layer in LAST_LAYERS], 1)
    # NLL of each answer token: token 0 from the prefix's last logits, token t from the answer's position t − 1
    logits = lm.model.lm_head(hs[-1][:, :-1][mask[:, 1:].bool()])
    logp_rest = torch.log_softmax(logits, -1).gather(1, ids[:, 1:][mask[:, 1:].bool()].unsqueeze(1))[:, 0]
    logp_first = torch.log_softmax(prefix_logits, -1)[ids[:, 0]]
    nll = np.zeros((b, 4), np.float32)
    rest = (-logp_rest).numpy()
    counts = (mask.sum(1) - 1).tolist()
    start = 0
    for i, c in enumerate(counts):
        tok_nll = np.r_[-logp_first[i].item(), rest[start:start + c]]
        start += c
        nll[i] = [tok_nll.mean(), tok_nll.max(), tok_nll[0], len(tok_nll)]
    return mean.numpy().astype(np.float16), last.numpy().astype(np.float16), nll


def extract(pairs: Sequence[tuple[str, str]], echo=print) -> dict[str, np.ndarray]:
    """LM features of every (question, answer) pair (see the module docstring)."""
    import torch

    from bench.models import load_model

    torch.set_num_threads(1)
    lm = load_model(MODEL)
    tok, n = lm.tokenizer, len(pairs)
    d = lm.model.config.hidden_size
    mean = np.zeros((n, len(LAYERS), d), np.float16)
    last = np.zeros((n, len(LAST_LAYERS), d), np.float16)
    nll = np.zeros((n, 4), np.float32)
    by_q: dict[str, list[int]] = defaultdict(list)
    for i, (q, _) in enumerate(pairs):
        by_q[q].append(i)
    t0, done = time.perf_counter(), 0
    with torch.no_grad():
        for q, rows in by_q.items():
            p_ids = torch.tensor([tok(f"Q: {q}\nA:")["input_ids"]])
            pre = lm.model.model(input_ids=p_ids, use_cache=True)
            prefix_logits = lm.model.lm_head(pre.last_hidden_state[0, -1])
            ans = {i: _answer_ids(tok, pairs[i][1]) for i in rows}
            order = sorted(rows, key=lambda i: len(ans[i]))
            for s in range(0, len(order), CHUNK):
                chunk = order[s:s + CHUNK]
                mean[chunk], last[chunk], nll[chunk] = _chunk_features(lm, pre.past_key_values, prefix_logits,
                                                                       [ans[i] for i in chunk])
            done += len(rows)
            if done // 1000 != (done - len(rows)) // 1000:
                el = time.perf_counter() - t0
                echo(f"  LM features: {done}/{n} pairs, {el:.0f} s, projected total {el * n / done:.0f} s")
    return {"mean": mean, "last": last, "nll": nll}


def cached_features(pairs: Sequence[tuple[str, str]], echo=print) -> tuple[dict[str, np.ndarray], dict]:
    """``extract`` once per pair list; a rerun loads the ``.npz`` (a ``--sample`` run takes its rows from a cached
    superset when there is one)."""
    key = pairs_key(pairs)
    path = feature_cache_dir() / f"{key}.npz"
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        _save_pair_list(path, pairs)
        return dict(np.load(path)), {**json.loads(meta_path.read_text()), "loaded_from_cache": True}
    hit = _from_superset(pairs)
    if hit is not None:
        return hit
    t = time.perf_counter()
    feats = extract(pairs, echo)
    meta = {"pairs": len(pairs), "key": key, "seconds": round(time.perf_counter() - t, 1),
            "path": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **feats)
    meta["bytes"] = path.stat().st_size
    meta_path.write_text(json.dumps(meta, indent=2))
    _save_pair_list(path, pairs)
    return feats, {**meta, "loaded_from_cache": False}


def _save_pair_list(path: Path, pairs: Sequence[tuple[str, str]]) -> None:
    listing = path.with_suffix(".pairs.json")
    if not listing.is_file():
        listing.write_text(json.dumps([list(p) for p in pairs]))


def _from_superset(pairs: Sequence[tuple[str, str]]) -> tuple[dict[str, np.ndarray], dict] | None:
    """Rows of a cached extraction (same settings) that holds every pair, or None."""
    for listing in sorted(feature_cache_dir().glob("*.pairs.json")):
        stored = [tuple(p) for p in json.loads(listing.read_text())]
        if pairs_key(stored) != listing.name.split(".")[0]:
            continue  # made with other settings
        where = {p: i for i, p in enumerate(stored)}
        if all(p in where for p in pairs):
            npz = listing.with_name(listing.name.split(".")[0] + ".npz")
            idx = np.array([where[p] for p in pairs])
            meta = json.loads(npz.with_suffix(".json").read_text())
            return {k: v[idx] for k, v in np.load(npz).items()}, {**meta, "loaded_from_cache": True,
                                                                   "subset_of": meta["key"]}
    return None


def lm_matrix(feats: dict[str, np.ndarray]) -> np.ndarray:
    """Label-free design matrix: PCA of the standardised hidden states + NLL statistics (log-count)."""
    hidden = np.hstack([feats["mean"].reshape(len(feats["nll"]), -1),
                        feats["last"].reshape(len(feats["nll"]), -1)]).astype(np.float32)
    hidden = StandardScaler().fit_transform(hidden)
    comp = PCA(min(PCA_DIM, *hidden.shape), random_state=SEED, svd_solver="randomized").fit_transform(hidden)
    nll = feats["nll"].copy()
    nll[:, 3] = np.log1p(nll[:, 3])
    return np.hstack([comp, nll]).astype(np.float64)


# ---------------------------------------------------------------- models

def _lr(c: float):
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))


def _inner_split(n: int, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(n)
    splitter = GroupShuffleSplit(1, test_size=0.2, random_state=SEED) if groups is not None else \
        ShuffleSplit(1, test_size=0.2, random_state=SEED)
    return next(splitter.split(idx, groups=groups))


def fit_lm(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None) -> tuple[object, float]:
    """Logistic regression on LM features, C chosen on an inner 80/20 split of these (training) rows only."""
    a, b = _inner_split(len(y), groups)
    acc = {c: float(((_lr(c).fit(X[a], y[a]).predict_proba(X[b])[:, 1] >= THRESHOLD) == y[b]).mean())
           for c in C_GRID}
    best = max(acc, key=acc.get)
    return _lr(best).fit(X, y), best


def lm_oof(X: np.ndarray, y: np.ndarray, groups: np.ndarray | None, c: float) -> np.ndarray:
    """Out-of-fold LM probabilities on the training rows (inner 5-fold, grouped by question when ``groups``)."""
    oof = np.zeros(len(y))
    cv = GroupKFold(FOLDS).split(X, groups=groups) if groups is not None else \
        KFold(FOLDS, shuffle=True, random_state=SEED).split(X)
    for a, b in cv:
        oof[b] = _lr(c).fit(X[a], y[a]).predict_proba(X[b])[:, 1]
    return oof


def with_column(rows: Rows, col: np.ndarray) -> Rows:
    return Rows(rows.questions, rows.answers, rows.spaces, np.hstack([rows.static, col[:, None]]))


def fit_stacked(feat: Featurizer, rows: Rows, y: np.ndarray, aspect: str, p_lm_oof: np.ndarray) -> AnswerClassifier:
    """``fit_aspect`` with the LM probability as one more static column. A synthetic broken negative (``info``)
    carries the LM probability of the answer it was made from (it has no LM features of its own)."""
    aug = with_column(rows, p_lm_oof)
    if NEGATIVES_PER_ANSWER[aspect] <= 0:
        return AnswerClassifier(SEED).fit(aug, y)
    neg, src = negatives_for(feat, rows, NEGATIVES_PER_ANSWER[aspect], SEED)
    return AnswerClassifier(SEED).fit(aug, y, with_column(neg, p_lm_oof[src]), src)


def choose_weight(feat: Featurizer, rows: Rows, X: np.ndarray, y: np.ndarray, aspect: str,
                  groups: np.ndarray | None, c: float) -> float:
    """Weight of the judge in the average, chosen on an inner 80/20 split of the training part."""
    a, b = _inner_split(len(y), groups)
    pj = fit_aspect(feat, rows.take(a), y[a], aspect, SEED).predict_rows(rows.take(b))
    pl = _lr(c).fit(X[a], y[a]).predict_proba(X[b])[:, 1]
    acc = {w: float((((w * pj + (1 - w) * pl) >= THRESHOLD) == y[b]).mean()) for w in W_GRID}
    return max(acc, key=lambda w: (acc[w], w))


# ---------------------------------------------------------------- evaluation

def run_protocol(feat: Featurizer, aspect: str, protocol: str, examples: list[Example], rows: Rows, X: np.ndarray,
                 broken: Rows, Xb: np.ndarray, echo=print) -> dict:
    """Every variant on the same outer folds; probabilities per variant for labelled and real broken rows."""
    y = np.array([e.label for e in examples], int)
    q = np.array([e.question for e in examples], dtype=object)
    p = {v: np.zeros(len(y)) for v in VARIANTS}
    pb = {v: np.full(len(broken), np.nan) for v in VARIANTS}
    synth: list[float] = []
    info: dict = {"C": [], "w": [], "seconds": defaultdict(float)}
    for k, (tr, te) in enumerate(splits(examples, protocol, FOLDS, SEED)):
        groups = q[tr] if protocol == "new-questions" else None
        train, test = rows.take(tr), rows.take(te)
        mine = _broken_in_fold(broken, examples, te, protocol, k, FOLDS)
        t = time.perf_counter()
        clf = fit_aspect(feat, train, y[tr], aspect, SEED)
        p["baseline"][te], pb["baseline"][mine] = clf.predict_rows(test), clf.predict_rows(broken.take(mine))
        made = corruptions(test.answers, 0.2, SEED + 1000 + k)
        synth += clf.predict_rows(Rows.build(feat, [test.questions[i] for i, _, _ in made],
                                             [s for _, _, s in made])).tolist()
        info["seconds"]["baseline"] += time.perf_counter() - t
        t = time.perf_counter()
        lm, c = fit_lm(X[tr], y[tr], groups)
        p["lm_only"][te], pb["lm_only"][mine] = lm.predict_proba(X[te])[:, 1], lm.predict_proba(Xb[mine])[:, 1]
        info["C"].append(c)
        info["seconds"]["lm_only"] += time.perf_counter() - t
        t = time.perf_counter()
        st = fit_stacked(feat, train, y[tr], aspect, lm_oof(X[tr], y[tr], groups, c))
        p["stacked"][te] = st.predict_rows(with_column(test, p["lm_only"][te]))
        pb["stacked"][mine] = st.predict_rows(with_column(broken.take(mine), pb["lm_only"][mine]))
        info["seconds"]["stacked"] += time.perf_counter() - t
        t = time.perf_counter()
        w = choose_weight(feat, train, X[tr], y[tr], aspect, groups, c)
        p["averaged"][te] = w * p["baseline"][te] + (1 - w) * p["lm_only"][te]
        pb["averaged"][mine] = w * pb["baseline"][mine] + (1 - w) * pb["lm_only"][mine]
        info["w"].append(w)
        info["seconds"]["averaged"] += time.perf_counter() - t
        echo(f"{aspect} / {protocol}: fold {k + 1}/{FOLDS} (C={c}, w={w}) "
             f"{ {v: round(s) for v, s in info['seconds'].items()} } s")
    return p, pb, synth, info


def score(y: np.ndarray, ref: np.ndarray, p: dict, pb: dict, synth: list[float], info: dict) -> dict:
    out = {}
    for v in VARIANTS:
        s = _scores(y, p[v], ref)
        out[v] = {"model_written": s["model_written"], "all_rows": {k: s["all_rows"][k] for k in
                                                                 ("accuracy", "kappa", "bias")},
                  "broken_real": _broken_rates(pb[v]), "train_predict_s": round(info["seconds"][v], 1)}
    out["baseline"]["broken_synthetic"] = _broken_rates(np.array(synth))
    out["lm_only"]["C_per_fold"] = info["C"]
    out["averaged"]["judge_weight_per_fold"] = info["w"]
    return out


def load_examples(data_dir: str, sample: int | None) -> dict[str, tuple[list[Example], dict]]:
    out = {}
    for aspect in ("truth", "info"):
        examples, stats = dedup_labels(aspect, data_dir)
        if sample is not None:
            examples = [examples[i] for i in np.random.RandomState(SEED).permutation(len(examples))[:sample]]
        out[aspect] = ([Example(e.question.strip(), e.answer, e.label) for e in examples], stats)
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sample", type=int, default=None, help="seeded pairs per aspect (quick run)")
    ap.add_argument("--data-dir", default=None, help="the data directory (default: BENCH_DATA_DIR, then the usual places)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default: judge_lm_features.json beside this script (a --sample run: in the temp dir)")
    ap.add_argument("--protocols", nargs="+", default=["new-questions", "deployment"], choices=PROTOCOLS)
    ap.add_argument("--extract-only", action="store_true", help="compute/cache the LM features and stop")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(__file__).with_suffix(".json") if args.sample is None else \
            Path(tempfile.gettempdir()) / f"judge_lm_features.sample{args.sample}.json"
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    refs, _ = _refs(args.data_dir)
    data = load_examples(args.data_dir, args.sample)
    bq, ba = _real_broken(refs)
    pairs = sorted({(e.question, e.answer) for ex, _ in data.values() for e in ex} | set(zip(bq, ba)))
    print(f"{len(pairs)} unique pairs to featurise", flush=True)
    feats, fmeta = cached_features(pairs, echo=lambda s: print(s, flush=True))
    print(f"LM features: {fmeta}", flush=True)
    if args.extract_only:
        return
    t = time.perf_counter()
    X_all = lm_matrix(feats)
    where = {pq: i for i, pq in enumerate(pairs)}
    pca_s = time.perf_counter() - t
    feat = Featurizer(refs, label_corpus(args.data_dir))
    broken = Rows.build(feat, bq, ba)
    Xb = X_all[[where[pq] for pq in zip(bq, ba)]]
    result: dict = {"settings": settings(args, fmeta, pca_s), "results": {}}
    prepared = {}
    for aspect, (examples, stats) in data.items():
        rows = Rows.build(feat, [e.question for e in examples], [e.answer for e in examples])
        X = X_all[[where[(e.question, e.answer)] for e in examples]]
        prepared[aspect] = (examples, stats, rows, X, np.array([e.label for e in examples], int),
                            _reference_mask(examples, refs))
    for protocol in args.protocols:  # new questions first: the targets are on that protocol
        for aspect, (examples, stats, rows, X, y, ref) in prepared.items():
            res = score(y, ref, *run_protocol(feat, aspect, protocol, examples, rows, X, broken, Xb,
                                              echo=lambda s: print(s, flush=True)))
            res["data"] = {**stats, "rows": len(examples), "reference_rows": int(ref.sum())}
            result["results"].setdefault(aspect, {})[protocol] = res
            print(table_line(aspect, protocol, res), flush=True)
            args.out.write_text(json.dumps(result, indent=2))
    result["total_s"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['total_s']} s)")


def settings(args, fmeta: dict, pca_s: float) -> dict:
    return {"model": MODEL, "dtype": "float32", "device": "cpu", "text": "Q: {question}\\nA: {answer}",
            "question_prefix_cache": True, "layers_mean_pooled": LAYERS, "layers_last_token": LAST_LAYERS,
            "nll_stats": ["mean", "max", "first_token", "n_tokens"], "max_answer_tokens": MAX_ANSWER_TOKENS,
            "chunk": CHUNK, "pca_dim": PCA_DIM, "C_grid": C_GRID, "w_grid": W_GRID, "folds": FOLDS, "seed": SEED,
            "threshold": THRESHOLD, "sample": args.sample, "feature_extraction": fmeta,
            "pca_s": round(pca_s, 1), "machine": f"{platform.processor() or platform.machine()}, 1 thread while "
            "other jobs ran (2-core CPU box shared with a long CPU job)", "python": sys.version.split()[0],
            "command": "OMP_NUM_THREADS=1 .venv/bin/python results/generation/judge_lm_features.py"
            + (f" --sample {args.sample}" if args.sample else ""), "protocols": args.protocols}


def table_line(aspect: str, protocol: str, res: dict) -> str:
    cells = [f"{v} acc {res[v]['model_written']['accuracy']:.3f} κ {res[v]['model_written']['kappa']:.3f} "
             f"bias {res[v]['model_written']['bias']:+.3f} broken {res[v]['broken_real']['positive_rate']}"
             for v in VARIANTS]
    return f"{aspect} / {protocol}: " + " | ".join(cells)


if __name__ == "__main__":
    main()
