"""``report.html``: one self-contained page rendered from a results directory.

Everything is inline: CSS, PNG figures as base64 data URIs, and a few lines of JavaScript that only
turn the per-metric tables into tabs (without JavaScript every table is shown, one after another).
The page fetches nothing, so it can be mailed, archived or opened offline.

Layout: a header (benchmark, versions, device, seed, timings, models with ID accuracy, OOD sets,
auxiliary outliers, the run's notes), an overview dot plot per group of models evaluated on the same
sets, the summary table (group means of FPR95 / AUROC / AUPR-In / AUPR-Out, shaped like Table 1 of
Liu, Wang, Owens & Li, NeurIPS 2020), one table per metric with a column per OOD set (covariate-shift
sets apart, outside the means), and a closed section per detector with its numbers, ROC curves and
score histograms on the sets each model was evaluated on (opened on click or by a link to it).
"""

from __future__ import annotations

import html
import math
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np

from ..io import FileWriteError, atomic_write_text
from ..metrics import METRIC_NAMES
from ..tables import best_mask, metric_label, percent
from . import figures as plots
from .results import ID_KEY, OOD_GROUPS, Results, ReportError, correct_key, load_results, read_scores, score_key

__all__ = ["write_report", "render_report", "figure_pairs", "REPORT_FILE"]

REPORT_FILE = "report.html"

#: figures of the non-first models (the fine-tuned ones) show these scores when they have many detectors
MAIN_SCORES = ("energy", "msp")

DETECTOR_NAMES = {
    "msp": "MSP", "energy": "Energy", "odin": "ODIN", "max_logit": "MaxLogit", "entropy": "Entropy",
    "gen": "GEN", "kl_matching": "KL matching", "temperature_scaling": "Temperature scaling",
    "mahalanobis": "Mahalanobis", "relative_mahalanobis": "Relative Mahalanobis",
    "mahalanobis_ensemble": "Mahalanobis ensemble", "vim": "ViM", "residual": "Residual", "knn": "KNN",
    "she": "SHE", "fdbd": "fDBD", "nnguide": "NNGuide", "conjnorm": "ConjNorm", "react": "ReAct",
    "ash": "ASH", "scale": "SCALE", "dice": "DICE", "gradnorm": "GradNorm", "mc_dropout": "MC dropout",
}
MODEL_NAMES = {"pretrained": "pre-trained", "energy_finetuned": "energy fine-tuned", "oe_finetuned": "OE fine-tuned"}
GROUP_NAMES = {"near": "near-OOD", "far": "far-OOD", "covariate": "covariate shift"}
TIMING_KEYS = ("training", "extraction", "fitting", "scoring")
NO_FIGURE = ("No figure for this model: figures show every detector of the first model and the main scores (energy, MSP) "
             "of the others; `ebood report --all-figures DIR` draws them all.")


def e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def detector_name(name: str) -> str:
    return DETECTOR_NAMES.get(name, name.replace("_", " "))


def model_name(name: str) -> str:
    return MODEL_NAMES.get(name, name.replace("_", " "))


def anchor(*parts: str) -> str:
    """An HTML id made of safe characters (distinct names stay distinct: unsafe bytes are hex-coded)."""
    return "-".join(re.sub(r"[^A-Za-z0-9_]", lambda m: "." + m.group().encode().hex(), p) for p in parts)


def figure_pairs(results: Results, mode: Literal["auto", "all", "none"] = "auto") -> set[tuple[str, str]]:
    """Which (model, detector) pairs get a figure.

    ``auto``: every detector of the first model (the pre-trained one), and for each other model all of
    its detectors when it has at most three, else only its main scores (energy, MSP): the fine-tuned
    models are judged by the score they were trained for, and this keeps the report to a few MB.
    """
    if mode == "none":
        return set()
    if mode == "all":
        return set(results.pairs)
    if mode != "auto":
        raise ValueError(f"figures must be 'auto', 'all' or 'none', got {mode!r}")
    first, *others = results.models
    chosen = {(first, d) for d in results.detectors_of(first)}
    for model in others:
        detectors = results.detectors_of(model)
        if len(detectors) > 3:
            detectors = [d for d in MAIN_SCORES if d in detectors] or detectors[:1]
        chosen.update((model, d) for d in detectors)
    return chosen


# ---------------------------------------------------------------------------------------------
# header


def _fmt_seconds(value: Any) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "–"
    return f"{value:.1f} s" if value < 120 else f"{value / 60:.1f} min"


def _timings(results: Results) -> str:
    timings = results.raw.get("timings")
    if not isinstance(timings, Mapping) or not timings:
        return "<p class='muted'>not recorded</p>"
    parts = [(k, timings.get(k)) for k in TIMING_KEYS if isinstance(timings.get(k), (int, float))]
    parts += [(k, v) for k, v in timings.items() if k not in TIMING_KEYS + ("total",) and isinstance(v, (int, float))]
    spent = sum(max(float(v), 0.0) for _, v in parts) or 1.0
    bar = "".join(
        f"<span class='seg seg{i % 5}' style='width:{100 * max(float(v), 0.0) / spent:.2f}%' title='{e(k)}: {e(_fmt_seconds(v))}'></span>"
        for i, (k, v) in enumerate(parts)
    )
    legend = "".join(f"<li><span class='dot seg{i % 5}'></span>{e(k)} <b>{e(_fmt_seconds(v))}</b></li>" for i, (k, v) in enumerate(parts))
    total = f"<p class='total'>total <b>{e(_fmt_seconds(timings.get('total')))}</b></p>" if "total" in timings else ""
    return f"{total}<div class='tbar'>{bar}</div><ul class='legend'>{legend}</ul>"


def _models_table(results: Results) -> str:
    rows = []
    for model in results.models:
        info = results.model_info(model)
        acc = results.id_accuracy(model)
        acc_text = "–" if acc is None else f"{100 * acc:.2f}%"
        rows.append(
            f"<tr><td><b>{e(model_name(model))}</b><br><code>{e(model)}</code></td>"
            f"<td class='num' data-model='{e(model)}' data-metric='id_accuracy'>{acc_text}</td>"
            f"<td>{e(info.get('description', ''))}</td></tr>"
        )
    return ("<table class='plain'><thead><tr><th>model</th><th class='num'>ID accuracy</th><th>description</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _sets_table(results: Results) -> str:
    rows = []
    for name in results.sets:
        info = results.set_info(name)
        group = results.set_groups[name]
        n = info.get("n")
        rows.append(
            f"<tr><td><b>{e(name)}</b></td><td><span class='badge {e(group)}'>{e(GROUP_NAMES[group])}</span></td>"
            f"<td class='num'>{e(n) if n is not None else '–'}</td><td>{e(info.get('description', ''))}</td></tr>"
        )
    return ("<table class='plain'><thead><tr><th>set</th><th>group</th><th class='num'>samples</th><th>description</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def _when(value: Any) -> Any:
    """An ISO time as ``2025-01-02 03:04:05 +00:00``; anything else as given."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(value)).isoformat(sep=" ", timespec="seconds").replace("+", " +")
    except ValueError:
        return value


def _environment(results: Results) -> str:
    raw = results.raw
    items = [("ebood", raw.get("ebood_version")), ("device", raw.get("device")), ("seed", raw.get("seed")),
             ("created", _when(raw.get("created")) if raw.get("created") else None)]
    versions = raw.get("versions")
    if isinstance(versions, Mapping):
        items += [(k, v) for k, v in versions.items() if k != "ebood"]  # already the first item
    repeats = results.config.get("repeats")
    if isinstance(repeats, int) and repeats > 1:
        items.append(("repeats", f"{repeats} (metrics averaged)"))
    return "<dl class='kv'>" + "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items if v is not None) + "</dl>"


def _header(results: Results) -> str:
    raw = results.raw
    meta = " · ".join(e(x) for x in (f"ebood {raw.get('ebood_version', '?')}", _when(raw.get("created")), raw.get("device"),
                                      f"seed {raw.get('seed')}" if raw.get("seed") is not None else None) if x)
    aux = raw.get("auxiliary_outliers")
    aux_html = (f"<div class='card wide'><h3>Auxiliary outliers (fine-tuning)</h3><p>{e(aux)}</p></div>"
                if aux else "")
    return f"""
<header class="top">
  <p class="kicker">ebood benchmark report</p>
  <h1>{e(results.benchmark)}</h1>
  <p class="meta">{meta}</p>
</header>
<section class="cards">
  <div class="card"><h3>Models</h3>{_models_table(results)}</div>
  <div class="card"><h3>Timings</h3>{_timings(results)}</div>
  <div class="card"><h3>Run</h3>{_environment(results)}</div>
  <div class="card wide"><h3>OOD test sets</h3>{_sets_table(results)}</div>
  {aux_html}
</section>"""


# ---------------------------------------------------------------------------------------------
# tables


def _cell(value: float, column: str, metric: str, best: bool, inherited_metric: str | None = None) -> str:
    """A number cell. Its model and detector are ``data-*`` attributes of its row, its metric of its
    row or table where they all share one (``inherited_metric``): said once, the page is half as big."""
    cls = "num best" if best else "num"
    metric_attr = "" if metric == inherited_metric else f" data-metric='{metric}'"
    return f"<td class='{cls}' data-set='{e(column)}'{metric_attr}>{percent(value)}</td>"


def _row_head(model: str, detector: str) -> str:
    return (f"<th scope='row'><a href='#{anchor('m', model, detector)}' title='{e(model)}/{e(detector)}'>"
            f"{e(detector_name(detector))}</a></th>")


def _model_separator(results: Results, model: str, span: int) -> str:
    acc = results.id_accuracy(model)
    acc_text = "" if acc is None else f" <span class='muted'>· ID accuracy {100 * acc:.2f}%</span>"
    return f"<tr class='model'><th colspan='{span}'>{e(model_name(model))}{acc_text}</th></tr>"


def _body(results: Results, columns: Sequence[tuple[str, str, Any]], span: int, extra: Any = None,
          table_metric: str | None = None) -> str:
    """Rows grouped by model; ``columns`` = (data-set key, metric, value function(model, detector));
    ``extra(model, detector)`` adds a last cell; ``table_metric``: the table's ``data-metric``."""
    values = {(c, m): [fn(model, det) for model, det in results.pairs] for c, m, fn in columns}
    # No "best" among covariate-shift sets: whether a detector should flag them depends on the use.
    best = {key: [False] * len(v) if results.set_groups.get(key[0]) == "covariate" else best_mask(v, key[1])
            for key, v in values.items()}
    out, current = [], None
    for i, (model, det) in enumerate(results.pairs):
        if model != current:
            out.append(_model_separator(results, model, span))
            current = model
        cells = "".join(_cell(values[(c, m)][i], c, m, best[(c, m)][i], table_metric) for c, m, _ in columns)
        out.append(f"<tr data-model='{e(model)}' data-detector='{e(det)}'>{_row_head(model, det)}{cells}"
                   f"{extra(model, det) if extra else ''}</tr>")
    return "".join(out)


def _reference(results: Results) -> tuple[str, dict[str, float], str] | None:
    return results.reference()


def summary_table(results: Results) -> str:
    """Group means of every metric, one row per (model, detector)."""
    means = results.mean_columns()
    labels = {m: metric_label(m, tpr=results.tpr, positive=results.positive) for m in METRIC_NAMES}
    columns = [(f"mean:{key}", metric, (lambda mo, de, g=groups, me=metric: results.mean(mo, de, g, me)))
               for key, _, groups in means for metric in METRIC_NAMES]
    ref = _reference(results)
    span = 1 + len(columns) + (1 if ref else 0)
    top = "".join(f"<th colspan='{len(METRIC_NAMES)}' class='group'>{e(label)}</th>" for _, label, _ in means)
    sub = "".join(f"<th class='num'>{e(labels[m])} {'↓' if m == 'fpr95' else '↑'}</th>" for _ in means for m in METRIC_NAMES)
    extra: Callable[[str, str], str] | None = None
    if ref:
        metric, values, _ = ref
        top += "<th rowspan='2' class='num ref'>published<br>" + e(labels[metric]) + "</th>"

        def reference_cell(model: str, det: str) -> str:
            v = values.get(f"{model}/{det}")
            return (f"<td class='num ref' data-reference='{e(model)}/{e(det)}'>"
                    f"{'–' if v is None else f'{v:.2f}'}</td>")

        extra = reference_cell

    body = _body(results, columns, span, extra)
    note = (f"<p class='note'>Published: {e(ref[2])}.</p>" if ref and ref[2] else "")
    return (f"<div class='scroll'><table class='results' id='summary-table'><thead><tr><th rowspan='2'>detector</th>{top}</tr>"
            f"<tr>{sub}</tr></thead><tbody>{body}</tbody></table></div>{note}")


def per_set_table(results: Results, metric: str) -> str:
    """One metric, a column per OOD set and per group mean; covariate-shift sets last, set apart."""
    ood_sets = results.sets_in(OOD_GROUPS)
    covariate = results.sets_in(("covariate",))
    means = results.mean_columns()
    columns = [(s, metric, (lambda mo, de, s=s: results.value(mo, de, s, metric))) for s in ood_sets]
    columns += [(f"mean:{key}", metric, (lambda mo, de, g=groups: results.mean(mo, de, g, metric))) for key, _, groups in means]
    columns += [(s, metric, (lambda mo, de, s=s: results.value(mo, de, s, metric))) for s in covariate]
    span = 1 + len(columns)
    groups = [(g, results.sets_in((g,))) for g in OOD_GROUPS if results.sets_in((g,))]
    top = "".join(f"<th colspan='{len(sets)}' class='group {g}'>{e(GROUP_NAMES[g])}</th>" for g, sets in groups)
    top += f"<th colspan='{len(means)}' class='group mean'>means</th>"
    if covariate:
        top += f"<th colspan='{len(covariate)}' class='group covariate'>covariate shift<br><small>not in the means</small></th>"
    sub = "".join(f"<th class='num'>{e(s)}</th>" for s in ood_sets)
    sub += "".join(f"<th class='num mean'>{e(label.replace(' mean', ''))}</th>" for _, label, _ in means)
    sub += "".join(f"<th class='num covariate'>{e(s)}</th>" for s in covariate)
    label = metric_label(metric, tpr=results.tpr, positive=results.positive)
    return (f"<div class='scroll'><table class='results per-set' id='table-{metric}' data-metric-table='{metric}' data-metric='{metric}'>"
            f"<caption>{e(label)} (%) {'lower' if metric == 'fpr95' else 'higher'} is better</caption>"
            f"<thead><tr><th rowspan='2'>detector</th>{top}</tr><tr>{sub}</tr></thead>"
            f"<tbody>{_body(results, columns, span, table_metric=metric)}</tbody></table></div>")


def _detector_table(results: Results, model: str, detector: str) -> str:
    """One model and detector: a row per metric, a column per OOD set, the means, then covariate sets
    (wide and short, to sit above the figure of the same sets); only the sets the model was evaluated on."""
    evaluated = results.model_sets(model)
    ood_sets = [s for s in results.sets_in(OOD_GROUPS) if s in evaluated]
    covariate = [s for s in results.sets_in(("covariate",)) if s in evaluated]
    means = [c for c in results.mean_columns() if any(s in evaluated for s in results.sets_in(c[2]))]
    head = "".join(f"<th class='num'>{e(s)}<br><span class='badge {results.set_groups[s]}'>{e(results.set_groups[s])}</span></th>"
                   for s in ood_sets)
    head += "".join(f"<th class='num mean'>{e(label)}</th>" for _, label, _ in means)
    head += "".join(f"<th class='num covariate'>{e(s)}<br><span class='badge covariate'>covariate</span></th>" for s in covariate)
    rows = []
    for m in METRIC_NAMES:
        cells = [_cell(results.value(model, detector, s, m), s, m, False, m) for s in ood_sets]
        cells += [_cell(results.mean(model, detector, g, m), f"mean:{k}", m, False, m) for k, _, g in means]
        cells += [_cell(results.value(model, detector, s, m), s, m, False, m) for s in covariate]
        label = metric_label(m, tpr=results.tpr, positive=results.positive)
        rows.append(f"<tr data-metric='{m}'><th scope='row'>{e(label)} {'↓' if m == 'fpr95' else '↑'}</th>{''.join(cells)}</tr>")
    return (f"<table class='results compact' data-model='{e(model)}' data-detector='{e(detector)}'><thead><tr><th>%</th>{head}</tr>"
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


# ---------------------------------------------------------------------------------------------
# figures and sections


def _figure_jobs(results: Results, scores: Mapping[str, Any], pairs: Sequence[tuple[str, str]],
                 axis: str = "auto") -> list[tuple[Any, ...]]:
    jobs = []
    for model, det in pairs:
        evaluated = results.model_sets(model)
        sets = [plots.SetScores(s, results.set_groups[s], scores.get(score_key(model, det, s)),
                                results.values.get((model, det, s), {})) for s in results.sets if s in evaluated]
        jobs.append((scores.get(score_key(model, det, ID_KEY)), sets, results.tpr, results.positive, axis))
    return jobs


def _draw(job: tuple[Any, ...]) -> str:
    id_scores, sets, tpr, positive, axis = job
    return plots.detector_figure(id_scores, sets, tpr=tpr, positive=positive, axis=axis)


def _workers(requested: int | None, n_jobs: int) -> int:
    if requested is not None:
        return max(1, min(int(requested), n_jobs))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8, n_jobs // 3))  # a worker pays off from ~3 figures on


def detector_figures(results: Results, scores: Mapping[str, Any], pairs: Sequence[tuple[str, str]],
                     workers: int | None = None, axis: str = "auto") -> dict[tuple[str, str], str]:
    """PNG data URIs of the (model, detector) figures, drawn in ``workers`` forked processes.

    Matplotlib spends most of a report's time laying out text; figures are independent, so they are
    drawn in parallel where ``fork`` exists (the children only run numpy and matplotlib). Any failure
    of the pool falls back to drawing here, one after another; the result is the same either way.
    """
    jobs = _figure_jobs(results, scores, pairs, axis)
    n = _workers(workers, len(jobs))
    if n > 1 and "fork" in multiprocessing.get_all_start_methods():
        import matplotlib.backends.backend_agg  # noqa: F401 - imported once here, inherited by every worker
        import PIL.Image  # noqa: F401

        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:
            with ProcessPoolExecutor(max_workers=n, mp_context=multiprocessing.get_context("fork")) as pool:
                return dict(zip(pairs, pool.map(_draw, jobs, chunksize=max(1, len(jobs) // (4 * n)))))
        except (BrokenProcessPool, OSError):
            pass
    return dict(zip(pairs, map(_draw, jobs)))


def _figure_key(results: Results) -> str:
    """The figures' legend, drawn by the page (identical for every figure)."""
    kept = "OOD" if results.positive == "ood" else "ID"
    return ("<figcaption class='key'><span><i class='sw id'></i>in-distribution (test)</span>"
            "<span><i class='sw ood'></i>OOD set</span>"
            f"<span><i class='ln dashed'></i>threshold keeping {100 * results.tpr:g}% of {kept} (its FPR on the right)</span>"
            "<span><i class='ln'></i>near-OOD</span><span><i class='ln dashed'></i>far-OOD</span>"
            "<span><i class='ln dotted'></i>covariate shift</span><span class='muted'>(ROC line styles)</span></figcaption>")


def _figure_html(results: Results, uri: str, model: str, detector: str) -> str:
    alt = f"{detector_name(detector)} on the {model_name(model)} model: ROC curves and score histograms of ID vs each OOD set"
    return f"<figure class='plot'><img src='{uri}' alt='{e(alt)}' loading='lazy' decoding='async'></figure>"


def _model_groups(results: Results) -> list[list[str]]:
    """Models grouped by the OOD sets they were evaluated on, the first model's group first: a model
    with its own sets (an open-set split, another ID set) answers another question, so it gets its own
    overview axes rather than dots beside the others'."""
    groups: dict[frozenset[str], list[str]] = {}
    for model in results.models:
        groups.setdefault(frozenset(results.model_sets(model)), []).append(model)
    return list(groups.values())


def _overview(results: Results) -> str:
    """Each detector's group means for every model, ranked by the first model's overall mean FPR; one
    figure per group of models evaluated on the same sets."""
    fpr = metric_label("fpr95", tpr=results.tpr, positive=results.positive)
    out = []
    for i, models in enumerate(_model_groups(results)):
        evaluated = set().union(*(results.model_sets(m) for m in models))
        means = [c for c in results.mean_columns() if any(s in evaluated for s in results.sets_in(c[2]))]
        overall = means[-1][2]
        first = models[0]
        pairs = set(results.pairs)
        detectors = [d for d in _detectors_in_order(results) if any((m, d) in pairs for m in models)]
        detectors.sort(key=lambda d: _nan_last(results.mean(first, d, overall, "fpr95")))
        shown = [c for c in means if c[0] != "all"] or means
        panels = []
        for metric, name in (("fpr95", fpr), ("auroc", "AUROC")):
            for key, label, groups in shown:
                values = {m: [results.mean(m, d, groups, metric) for d in detectors] for m in models}
                panels.append((f"{label}: {name} (%)", metric, values))
        uri = plots.overview_figure(detectors, models, panels, detector_labels={d: detector_name(d) for d in detectors})
        names = ", ".join(model_name(m) for m in models)
        why = "" if i == 0 else (f" Evaluated on other OOD sets than the {e(model_name(results.models[0]))} model "
                                 f"({e(', '.join(sorted(evaluated)))}), so on axes of {'their' if len(models) > 1 else 'its'} own.")
        out.append(f"<figure class='plot overview'><img src='{uri}' alt='{e(names)}: every detector with the group means "
                   f"of FPR and AUROC'><figcaption>Each line is a detector, each dot a model; detectors are ranked "
                   f"by the {e(model_name(first))} model's mean {e(fpr)}.{why}</figcaption></figure>")
    return "".join(out)


def _detectors_in_order(results: Results) -> list[str]:
    return list(dict.fromkeys(d for _, d in results.pairs))


def _nan_last(x: float) -> float:
    return math.inf if math.isnan(x) else x


def _detector_summary(results: Results, det: str) -> str:
    """The line a closed detector section shows: each model's overall mean FPR."""
    fpr = metric_label("fpr95", tpr=results.tpr, positive=results.positive)
    overall = results.mean_columns()[-1][2]
    parts = [f"{e(model_name(m))} {percent(results.mean(m, det, overall, 'fpr95'))}" for m, d in results.pairs if d == det]
    return f"<span class='muted'>mean {e(fpr)}: {' · '.join(parts)}</span>"


def _detector_sections(results: Results, uris: Mapping[tuple[str, str], str], note: str | None) -> str:
    """A closed <details> per detector (the page stays short; its figures load when opened)."""
    detectors = _detectors_in_order(results)
    out = []
    for det in detectors:
        blocks = []
        for model in [m for m, d in results.pairs if d == det]:
            if (model, det) in uris:
                figure = _figure_html(results, uris[(model, det)], model, det)
            else:
                figure = f"<p class='note'>{e(note) if note else NO_FIGURE}</p>"
            blocks.append(
                f"<div class='model-block' id='{anchor('m', model, det)}'>"
                f"<h4>{e(model_name(model))} <code>{e(model)}/{e(det)}</code></h4>"
                f"<div class='scroll'>{_detector_table(results, model, det)}</div>{figure}</div>"
            )
        key = _figure_key(results) if any((m, det) in uris for m in results.models) else ""
        out.append(f"<section class='detector' id='{anchor('det', det)}' data-detector='{e(det)}'><details>"
                   f"<summary><h3>{e(detector_name(det))} <code>{e(det)}</code></h3> {_detector_summary(results, det)}</summary>"
                   f"{key}{''.join(blocks)}<p><a class='up' href='#summary'>↑ summary</a></p></details></section>")
    return "".join(out)


def _detector_index(results: Results) -> str:
    seen = _detectors_in_order(results)
    return "<p class='chips'>" + "".join(f"<a href='#{anchor('det', d)}'>{e(detector_name(d))}</a>" for d in seen) + "</p>"


def _how_to_read(results: Results) -> str:
    tpr = f"{100 * results.tpr:g}%"
    if results.positive == "ood":
        fpr = f"the share of ID samples flagged as OOD when {tpr} of OOD samples are flagged (OpenOOD's reading)"
    else:
        fpr = f"the share of OOD samples accepted as in-distribution when {tpr} of ID samples are accepted (the energy paper's reading)"
    label = metric_label("fpr95", tpr=results.tpr, positive=results.positive)
    return f"""
<details class="howto"><summary>How to read this report</summary>
<ul>
<li>Every detector outputs an OOD score: <b>higher means more out-of-distribution</b>.</li>
<li><b>{e(label)}</b> (lower is better): {e(fpr)}. <b>AUROC</b>: the chance that a random OOD sample scores above a random ID sample.
<b>AUPR-In</b> / <b>AUPR-Out</b>: average precision with ID / OOD as the positive class. All in percent.</li>
<li>Near- and far-OOD means average the sets of each group; covariate-shift sets (same classes, different look) are shown apart and never enter a mean.</li>
<li>The best value of each column is <span class="best-demo">highlighted</span>. A detector's name links to its section: numbers per set, ROC curves and the score histograms of ID (blue) against each OOD set (vermillion) with the threshold that keeps {e(tpr)} of the {'OOD' if results.positive == 'ood' else 'ID'} samples.</li>
</ul></details>"""


# ----- failure detection and selective prediction (docs/failure.md) ---------------------------

#: detectors drawn in a model's risk-coverage figure: the best by AURC (plus msp, the baseline)
RISK_COVERAGE_CURVES = 6
_EVERY_GROUP = OOD_GROUPS + ("covariate",)


def failure_table(results: Results) -> str:
    """Misclassification AUROC and AURC on the ID test predictions, failure AURC over ID + OOD."""
    columns = [("failure:misclf", "misclf_auroc", lambda mo, de: results.mean(mo, de, _EVERY_GROUP, "misclf_auroc")),
               ("failure:aurc", "aurc", lambda mo, de: results.mean(mo, de, _EVERY_GROUP, "aurc")),
               ("failure:ood", "failure_aurc", lambda mo, de: results.mean(mo, de, OOD_GROUPS, "failure_aurc"))]
    head = ("<th class='num'>misclassification AUROC ↑</th><th class='num'>AURC ↓ (ID)</th>"
            "<th class='num'>failure AURC ↓ (ID + OOD set, mean)</th>")
    return (f"<div class='scroll'><table class='results' id='failure-table'><thead><tr><th>detector</th>{head}</tr></thead>"
            f"<tbody>{_body(results, columns, 1 + len(columns))}</tbody></table></div>")


def risk_coverage_figures(results: Results) -> str:
    """One risk-coverage figure per model whose ID correctness was saved."""
    keys = {correct_key(m) for m in results.models} | {score_key(m, d, ID_KEY) for m, d in results.pairs}
    scores, _ = read_scores(results, keys)
    out = []
    for model in results.models:
        correct = scores.get(correct_key(model))
        if correct is None or correct.size == 0:
            continue
        aurc = {d: results.mean(model, d, _EVERY_GROUP, "aurc") for d in results.detectors_of(model)}
        ranked = sorted((d for d, v in aurc.items() if not math.isnan(v)), key=aurc.__getitem__)
        shown = ranked[:RISK_COVERAGE_CURVES] + [d for d in ranked[RISK_COVERAGE_CURVES:] if d == "msp"]
        curves = {detector_name(d): (scores[score_key(model, d, ID_KEY)], aurc[d]) for d in shown
                  if scores.get(score_key(model, d, ID_KEY), np.empty(0)).size == correct.size}
        if curves:
            uri = plots.risk_coverage_figure(curves, correct > 0.5, title=model_name(model))
            out.append(f"<figure class='plot'><img src='{uri}' alt='Risk-coverage curves of the {e(model)} model'>"
                       f"<figcaption>{e(model_name(model))}: share of wrong predictions among the accepted ones as the threshold "
                       f"accepts more (the {len(curves)} detectors with the lowest AURC{', and MSP' if 'msp' in shown[RISK_COVERAGE_CURVES:] else ''}).</figcaption></figure>")
    return "".join(out)


def _failure_section(results: Results) -> str:
    if not results.has_failure_metrics():
        return ""
    return ("<section id='failure'><h2>Failure detection and selective prediction</h2>"
            "<p class='note'>Rejecting the predictions that would be wrong (docs/failure.md): misclassification AUROC with the "
            "correct predictions as the kept class, AURC (area under the risk-coverage curve) on the ID test set, and failure AURC "
            "over ID and each OOD set with every OOD sample counted as a failure (Jaeger et al., ICLR 2023).</p>"
            f"{failure_table(results)}{risk_coverage_figures(results)}</section>")


def render_report(results: Results, *, figures_mode: Literal["auto", "all", "none"] = "auto",
                  workers: int | None = None, histogram_axis: str = "auto") -> str:
    """The report page as a string (``workers``: processes drawing figures; default: one per CPU;
    ``histogram_axis``: see :data:`ebood.report.figures.HISTOGRAM_AXES`)."""
    if histogram_axis not in plots.HISTOGRAM_AXES:
        raise ValueError(f"histogram_axis must be one of {', '.join(plots.HISTOGRAM_AXES)}, got {histogram_axis!r}")
    with_figures = [p for p in results.pairs if p in figure_pairs(results, figures_mode)]
    keys = {score_key(m, d, s) for m, d in with_figures for s in (*results.sets, ID_KEY)}
    scores, note = read_scores(results, keys) if with_figures else ({}, None)
    uris = detector_figures(results, scores, with_figures, workers, histogram_axis) if scores else {}
    metric_tabs = "".join(
        f"<button type='button' data-tab='{m}'>{e(metric_label(m, tpr=results.tpr, positive=results.positive))}</button>"
        for m in METRIC_NAMES
    )
    per_set = "".join(f"<div class='tab' data-panel='{m}'>{per_set_table(results, m)}</div>" for m in METRIC_NAMES)
    notes = results.raw.get("notes") if isinstance(results.raw.get("notes"), list) else []
    warning = "".join(f"<p class='warning'>{e(n)}</p>" for n in ([note] if note else []) + [str(n) for n in notes])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>ebood report: {e(results.benchmark)}</title>
<style>{CSS}</style>
</head>
<body>
<nav class="bar"><b>ebood</b><a href="#overview">Overview</a><a href="#summary">Summary</a><a href="#per-set">Per OOD set</a>{'<a href="#failure">Failure</a>' if results.has_failure_metrics() else ''}<a href="#detectors">Detectors</a></nav>
<main>
{_header(results)}
{warning}
{_how_to_read(results)}
<section id="overview"><h2>Overview</h2>{_overview(results)}</section>
<section id="summary"><h2>Summary: means over OOD sets</h2>{summary_table(results)}</section>
<section id="per-set"><h2>Per OOD set</h2><div class="tabs" role="tablist">{metric_tabs}</div>{per_set}</section>
{_failure_section(results)}
<section id="detectors"><h2>Detectors</h2>{_detector_index(results)}{_detector_sections(results, uris, note)}</section>
<footer>Rendered by ebood from <code>results.json</code> and <code>scores.safetensors</code> in {e(results.directory.name)}. Re-render with <code>ebood report {e(results.directory.name)}</code>.</footer>
</main>
<script>{JS}</script>
</body>
</html>
"""


def write_report(results_dir: str | Path, *, figures: Literal["auto", "all", "none"] = "auto",
                 workers: int | None = None, histogram_axis: str = "auto") -> Path:
    """Render ``results_dir/report.html`` from ``results.json`` and ``scores.safetensors``; returns its path.

    ``figures`` chooses the (model, detector) pairs that get histograms and ROC curves (see
    :func:`figure_pairs`); ``workers`` processes draw them (default: one per CPU, at most 8);
    ``histogram_axis`` is the score histograms' x axis and bar scale: ``auto`` (a log scale for a set
    that is one spike, as MSP's at -1), ``linear``, ``log`` or ``rank`` (the score's rank among ID
    scores, which puts every detector on [0, 1]). A directory without results, or with malformed ones, raises
    :class:`~ebood.report.ReportError` naming the file and the problem.
    """
    results = load_results(results_dir)
    page = render_report(results, figures_mode=figures, workers=workers, histogram_axis=histogram_axis)
    path = results.directory / REPORT_FILE
    try:
        atomic_write_text(path, page)
    except OSError as exc:
        raise ReportError(str(exc) if isinstance(exc, FileWriteError) else f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return path


# Tabs are a progressive enhancement: without this script every per-metric table is visible.
JS = """
(function () {
  // a link to a detector's block opens its (closed) section
  function openTarget() {
    var id = decodeURIComponent(location.hash.slice(1)), node = id && document.getElementById(id);
    var own = node && node.querySelector(':scope > details');
    if (own) own.open = true;
    for (; node; node = node.parentElement) if (node.tagName === 'DETAILS') node.open = true;
    if (id && document.getElementById(id)) document.getElementById(id).scrollIntoView();
  }
  window.addEventListener('hashchange', openTarget);
  openTarget();
})();
(function () {
  var buttons = document.querySelectorAll('.tabs button'), panels = document.querySelectorAll('.tab');
  if (!buttons.length) return;
  function show(name) {
    panels.forEach(function (p) { p.hidden = p.getAttribute('data-panel') !== name; });
    buttons.forEach(function (b) { b.setAttribute('aria-selected', b.getAttribute('data-tab') === name); });
  }
  buttons.forEach(function (b) { b.addEventListener('click', function () { show(b.getAttribute('data-tab')); }); });
  document.documentElement.classList.add('js');
  show(buttons[0].getAttribute('data-tab'));
})();
"""

CSS = """
:root { --ink:#1d2330; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f6f7f9; --card:#fff; --accent:#0072B2;
  --best:#d7e9f7; --near:#117733; --far:#332288; --cov:#882255; }
* { box-sizing:border-box; }
html { scroll-behavior:smooth; }
body { margin:0; background:var(--bg); color:var(--ink);
  font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif; }
main { max-width:1240px; margin:0 auto; padding:0 20px 40px; }
a { color:var(--accent); text-decoration:none; } a:hover { text-decoration:underline; }
code { font:0.85em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace; color:var(--muted); }
h1 { font-size:2rem; margin:0 0 4px; letter-spacing:-0.01em; }
h2 { font-size:1.35rem; margin:36px 0 12px; padding-bottom:6px; border-bottom:2px solid var(--line); }
h3 { font-size:1.05rem; margin:0 0 8px; }
h4 { font-size:0.98rem; margin:18px 0 8px; }
.bar { position:sticky; top:0; z-index:5; display:flex; gap:18px; align-items:center; padding:10px 20px;
  background:rgba(255,255,255,0.94); border-bottom:1px solid var(--line); backdrop-filter:blur(4px); }
.bar b { color:var(--accent); margin-right:6px; }
.top { padding:28px 0 8px; }
.kicker { text-transform:uppercase; letter-spacing:0.08em; font-size:0.75rem; color:var(--muted); margin:0; }
.meta { color:var(--muted); margin:0; }
.muted { color:var(--muted); }
.cards { display:grid; grid-template-columns:repeat(auto-fit,minmax(290px,1fr)); gap:14px; margin-top:16px; }
.card { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:14px 16px; }
.card.wide { grid-column:1/-1; }
.card p { margin:4px 0; }
.kv { display:grid; grid-template-columns:auto 1fr; gap:2px 12px; margin:0; font-size:0.9rem; }
.kv dt { color:var(--muted); } .kv dd { margin:0; overflow-wrap:anywhere; }
.total { margin:0 0 6px; }
.tbar { display:flex; height:12px; border-radius:6px; overflow:hidden; background:var(--line); }
.seg { display:block; height:100%; }
.seg0 { background:#0072B2; } .seg1 { background:#E69F00; } .seg2 { background:#009E73; }
.seg3 { background:#CC79A7; } .seg4 { background:#56B4E9; }
.legend { list-style:none; padding:0; margin:8px 0 0; display:flex; flex-wrap:wrap; gap:4px 14px; font-size:0.88rem; }
.dot { display:inline-block; width:10px; height:10px; border-radius:50%; margin-right:5px; vertical-align:-1px; }
.badge { display:inline-block; white-space:nowrap; font-size:0.72rem; padding:1px 7px; border-radius:9px; color:#fff; vertical-align:1px; }
.badge.near { background:var(--near); } .badge.far { background:var(--far); } .badge.covariate { background:var(--cov); }
.warning { background:#fff4e0; border:1px solid #E69F00; border-radius:8px; padding:10px 14px; }
.howto { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px 16px; margin-top:16px; }
.howto summary { cursor:pointer; font-weight:600; } .howto ul { margin:8px 0 0; padding-left:20px; }
.best-demo { background:var(--best); font-weight:700; padding:0 4px; border-radius:3px; }
.scroll { overflow-x:auto; background:var(--card); border:1px solid var(--line); border-radius:10px; }
table { border-collapse:collapse; font-variant-numeric:tabular-nums; }
table.plain { width:100%; font-size:0.9rem; }
table.plain th, table.plain td { text-align:left; padding:4px 8px 4px 0; border-bottom:1px solid var(--line); vertical-align:top; }
table.results { width:100%; font-size:0.84rem; }
table.results caption { text-align:left; padding:10px 12px 0; color:var(--muted); font-size:0.85rem; }
table.results th, table.results td { padding:3px 7px; border-bottom:1px solid var(--line); white-space:nowrap; }
table.results thead th { background:#fafbfc; font-weight:600; font-size:0.78rem; color:#334; }
table.results th.group { text-align:center; border-bottom:2px solid var(--line); }
table.results th.group.near { color:var(--near); } table.results th.group.far { color:var(--far); }
table.results th.group.covariate, table.results th.covariate { color:var(--cov); }
table.results th[scope=row] { text-align:left; font-weight:500; }
.num { text-align:right; }
td.best { background:var(--best); font-weight:700; }
tr.model th { text-align:left; background:#eef2f7; font-weight:700; font-size:0.85rem; padding-top:7px; }
tbody tr:not(.model):hover td, tbody tr:not(.model):hover th { background:#f3f6fa; }
tbody tr:not(.model):hover td.best { background:#c4def2; }
td.ref, th.ref { color:var(--muted); border-left:2px solid var(--line); }
th.mean, td[data-set^="mean:"] { border-left:1px solid var(--line); }
table.compact .badge { font-weight:500; }
table.compact td[data-set^="mean:"] { background:#fafbfc; font-weight:600; }
.note { color:var(--muted); font-size:0.85rem; }
.tabs { display:none; gap:6px; margin:0 0 10px; }
.js .tabs { display:flex; }
.tabs button { font:inherit; margin:0; font-size:0.88rem; padding:5px 12px; border-radius:16px; border:1px solid var(--line);
  background:var(--card); color:var(--ink); cursor:pointer; }
.tabs button[aria-selected=true] { background:var(--accent); border-color:var(--accent); color:#fff; }
.tab + .tab { margin-top:14px; } .js .tab + .tab { margin-top:0; }
.chips { display:flex; flex-wrap:wrap; gap:6px; }
.chips a { background:var(--card); border:1px solid var(--line); border-radius:14px; padding:2px 11px; font-size:0.88rem; }
section.detector { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:8px 18px; margin:8px 0; }
section.detector .scroll { border:0; }
section.detector summary { cursor:pointer; } section.detector summary h3 { display:inline; margin:0 10px 0 0; }
section.detector summary .muted { font-size:0.85rem; }
.up { font-size:0.8rem; font-weight:400; }
.model-block + .model-block { border-top:1px dashed var(--line); margin-top:14px; }
figure.plot { margin:12px 0 0; text-align:center; overflow-x:auto; }
figure.plot img { max-width:100%; min-width:640px; height:auto; }
figure.overview { background:var(--card); border:1px solid var(--line); border-radius:10px; padding:10px; }
figcaption { color:var(--muted); font-size:0.85rem; margin-top:4px; }
figcaption.key { display:flex; flex-wrap:wrap; justify-content:center; gap:4px 18px; color:var(--ink); margin:0 0 4px; }
.sw { display:inline-block; width:22px; height:11px; margin-right:6px; vertical-align:-1px; border-radius:2px; }
.sw.id { background:rgba(0,114,178,0.35); border:1.5px solid #0072B2; }
.sw.ood { background:rgba(213,94,0,0.35); border:1.5px solid #D55E00; }
.ln { display:inline-block; width:26px; margin-right:6px; vertical-align:3px; border-top:2px solid #333; }
.ln.dashed { border-top-style:dashed; } .ln.dotted { border-top-style:dotted; }
footer { margin-top:40px; color:var(--muted); font-size:0.85rem; }
@media (max-width:700px) { body { font-size:14px; } h1 { font-size:1.5rem; } .bar { gap:10px; overflow-x:auto; } }
"""
