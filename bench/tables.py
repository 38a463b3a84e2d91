"""Comparison tables built from results files (never from in-memory state): Markdown, CSV and LaTeX, with
reference figures from the papers shown beside ours where model, method and metric match."""

from __future__ import annotations

import glob
import math
from pathlib import Path

import pandas as pd

from bench.metrics import label, ordered
from bench.report import JUDGE_NOTE, fmt, judge_error, markdown_table, run_layer
from bench.runs import RunFolder, read_json, read_results_file

REFERENCE_FILE = Path(__file__).parent / "reference" / "figures.csv"
WINDOW_METRICS = ("ce", "kl", "empty_share", "fluency_ppl")  # n counts windows or samples, not questions


def load_results(paths: list[str]) -> list[dict]:
    """``results.json`` files given directly, as run directories, or as glob patterns."""
    found: list[Path] = []
    for p in paths:
        pattern = glob.has_magic(p)
        matches = [Path(m) for m in glob.glob(p)] if pattern else [Path(p)]
        for m in matches:
            if pattern and m.is_file() and m.suffix != ".json":
                continue  # a glob over a folder also matches its plots and tables
            f = RunFolder(m).results if m.is_dir() else m
            if f.is_file():
                found.append(f)
            elif not pattern:  # an explicit path must exist; a glob may match unfinished runs
                raise FileNotFoundError(f"no results.json at {m}")
    if not found:
        raise FileNotFoundError(f"no results found for {paths}")
    out = []
    for f in sorted(set(found)):
        res = read_json(f, "results file")
        if not isinstance(res, dict) or "config" not in res or "metrics" not in res:
            if any(glob.has_magic(p) for p in paths):
                continue  # a glob may also match other JSON files
        res = read_results_file(f)
        res["_path"] = str(f)
        out.append(res)
    if not out:
        raise FileNotFoundError(f"no results files among {paths}")
    return out


def long_table(results: list[dict]) -> pd.DataFrame:
    """One row per (run, metric): model, method, task, layer, metric, mean, se, n, folds."""
    rows = []
    for r in results:
        cfg = r["config"]
        for metric, v in r["metrics"].items():
            rows.append({"model": cfg["model"], "method": cfg["method"], "task": cfg["task"],
                         "layer": run_layer(r), "metric": metric, "mean": v["mean"], "se": v.get("se", math.nan),
                         "n": v.get("n"), "folds": len(r.get("folds", [])), "run": Path(r["_path"]).parent.name,
                         "judge_error": judge_error(r, metric), "path": r["_path"]})
    return pd.DataFrame(rows)


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """Rows (model, method, task, layer, run); a "mean ± se" column per metric, and the number of questions."""
    long = long.assign(
        cell=[fmt({"mean": m, "se": s}) + (f" ({j})" if j else "")
              for m, s, j in zip(long["mean"], long["se"], long["judge_error"])],
        layer=long["layer"].fillna("–").astype(str))
    keys = ["model", "method", "task", "layer", "run"]
    wide = long.groupby([*keys, "metric"], sort=False)["cell"].first().unstack("metric").reset_index()
    wide.columns.name = None
    # questions (prompts for toxicity), not KL/CE text windows; a KL/CE-only run shows its windows
    per_item = long.assign(n=long["n"].where(~long["metric"].isin(WINDOW_METRICS)))
    counts = per_item.groupby(keys, sort=False)["n"].max().fillna(long.groupby(keys, sort=False)["n"].max())
    wide["questions"] = counts.astype("Int64").values
    metrics = ordered(c for c in wide.columns if c not in (*keys, "questions"))
    # rows by model, then methods in registry order (the unintervened model first), then task, layer and run
    rank = {name: i for i, name in enumerate(_method_order())}
    wide = wide.assign(_rank=[rank.get(m, len(rank)) for m in wide["method"]])
    wide = wide.sort_values(["model", "_rank", "method", "task", "layer", "run"], kind="stable", ignore_index=True)
    wide = wide[["model", "method", "task", "layer", *metrics, "questions", "run"]].fillna("")
    return wide.rename(columns={m: label(m) for m in metrics})


def _method_order() -> list[str]:
    """Registered method names in registration order (``none`` first)."""
    from bench.interventions import load_methods

    return list(load_methods())


def reference_comparison(long: pd.DataFrame, reference_file: Path = REFERENCE_FILE) -> pd.DataFrame:
    """Our figure beside every published figure for the same model, method and metric, with the difference."""
    ref = pd.read_csv(reference_file)
    merged = long.merge(ref, on=["model", "method", "metric"], how="inner")
    merged["difference"] = merged["mean"] - merged["value"]
    return merged[["model", "method", "metric", "mean", "se", "value", "difference", "source"]].rename(
        columns={"mean": "ours", "value": "reference"})


def write_tables(results: list[dict], output: Path, name: str = "table") -> dict[str, Path]:
    """Write ``{name}.md``, ``{name}.csv``, ``{name}.tex`` (and the reference comparison in the Markdown)."""
    output.mkdir(parents=True, exist_ok=True)
    long = long_table(results)
    wide = wide_table(long)
    comp = reference_comparison(long)
    md = markdown_table([str(c) for c in wide.columns], [[str(x) for x in row] for row in wide.itertuples(index=False)])
    protocols = {((r.get("judge") or {}).get("validation") or {}).get("protocol") for r in results} - {None}
    if (long["judge_error"] != "").any():
        md += "\n\n" + JUDGE_NOTE.format(protocol="/".join(sorted(protocols)) or "–")
    if len(comp):
        md += "\n\nReference figures for the same model, method and metric:\n\n" + markdown_table(
            list(comp.columns), [[f"{x:.3f}" if isinstance(x, float) else str(x) for x in row]
                                 for row in comp.itertuples(index=False)])
    paths = {"md": output / f"{name}.md", "csv": output / f"{name}.csv", "tex": output / f"{name}.tex"}
    paths["md"].write_text(md + "\n")
    long.drop(columns=["path"]).to_csv(paths["csv"], index=False)
    paths["tex"].write_text(wide.to_latex(index=False, escape=True).replace(" ± ", r" $\pm$ "))
    return paths


def _paired_run(run: Path) -> tuple[dict | None, dict[int, dict]]:
    """A run folder's ``results.json`` (None when it has none: per-question records alone still pair) and its
    per-question records by question index; an unreadable or newer-format file is refused naming it."""
    folder = RunFolder(run)
    results = folder.read_results() if folder.finished() else None
    return results, {rec["index"]: rec for rec in folder.read_per_question()}


def _check_pairable(run_a: Path, res_a: dict | None, run_b: Path, res_b: dict | None) -> None:
    """Refuse pairing two runs whose items are not the same: other data (``data.checksum``: other questions or
    prompts, another --limit) or another task's items."""
    if res_a is None or res_b is None:
        return

    def items(res: dict) -> str:
        data = res.get("data") or {}
        n = data.get("n_questions", data.get("n_prompts"))
        return f"--task {res.get('config', {}).get('task')}, {n} {'prompts' if 'n_prompts' in data else 'questions'}"

    sums = [(r.get("data") or {}).get("checksum") for r in (res_a, res_b)]
    if None not in sums and sums[0] != sums[1]:
        raise ValueError(f"{run_a} and {run_b} were made on different data (A: {items(res_a)}, data checksum "
                         f"{sums[0][:12]}; B: {items(res_b)}, data checksum {sums[1][:12]}): a paired comparison "
                         "needs runs on the same questions (same data file, --limit and task)")


def paired_differences(run_a: Path, run_b: Path, metrics: tuple[str, ...] | None = None,
                       confidence: float = 0.95) -> pd.DataFrame:
    """Per-question (toxicity: per-prompt) paired difference B − A on the items both runs scored: mean, t-interval,
    paired t-test p. ``questions`` counts the items of each metric. Runs on different data (their results'
    ``data.checksum``) or without a per-question metric in common are refused."""
    from scipy import stats

    if not 0.0 < confidence < 1.0:  # (NaN fails this too)
        raise ValueError(f"--confidence must lie in (0, 1), e.g. 0.95; got {confidence}")
    (res_a, a), (res_b, b) = _paired_run(run_a), _paired_run(run_b)
    _check_pairable(run_a, res_a, run_b, res_b)
    common = sorted(set(a) & set(b))
    if len(common) < 2:
        raise ValueError(f"{run_a} and {run_b} share {len(common)} questions; a paired comparison needs ≥ 2")
    if metrics is None:  # every per-question metric both runs have (toxicity: per prompt)
        metrics = tuple(m for m in ("true", "info", "mc1", "mc2", "mc3", "answer_nll", "empty_share", "max_toxicity",
                                  "mean_ppl")
                        if all(m in a[i] and m in b[i] for i in common))
        if not metrics:
            task = [(r or {}).get("config", {}).get("task", "?") for r in (res_a, res_b)]
            raise ValueError(f"{run_a} (--task {task[0]}) and {run_b} (--task {task[1]}) have no per-question metric "
                             "in common: compare runs of tasks that score the same metrics")
    rows = []
    for m in metrics:
        both = [i for i in common if a[i].get(m) is not None and b[i].get(m) is not None]  # e.g. no kept PPL
        if len(both) < 2:
            raise ValueError(f"{m}: {len(both)} items scored by both runs; a paired comparison needs ≥ 2")
        x = [float(a[i][m]) for i in both]
        y = [float(b[i][m]) for i in both]
        d = pd.Series(y) - pd.Series(x)
        se = float(stats.sem(d))
        lo, hi = (stats.t.interval(confidence, len(d) - 1, loc=d.mean(), scale=se) if se > 0 else (d.mean(), d.mean()))
        p = float(stats.ttest_rel(y, x).pvalue) if se > 0 else float("nan")
        rows.append({"metric": m, "a": sum(x) / len(x), "b": sum(y) / len(y), "difference": float(d.mean()),
                     "ci_low": float(lo), "ci_high": float(hi), "p_value": p, "questions": len(both)})
    return pd.DataFrame(rows)
