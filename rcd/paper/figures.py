"""Paper figures (matplotlib, PNG + PDF): the kNN-LM (k, λ) grid, quality-vs-cost Pareto plots,
quality vs datastore size; and the ``{{key}}`` values a figure gives the paper text."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence


from rcd.paper.experiments import MISSING, Resolved, Run, dig, override_value
from rcd.paper.stats import (Estimate, answer_in_output, exact_match, is_qa, lm_change, quality, retrieval_rate,
                             time_to_first_token)
from rcd.paper.tables import fmt_ci, fmt_int, fmt_num, fmt_rate


def figure_values(spec: dict, collected: Sequence[tuple[Resolved, Optional[Run]]]) -> dict[str, str]:
    """Numbers of a figure for the paper's prose: ``<name>.best_k/best_lmbda/best_perplexity`` (knn_grid),
    ``<name>.<series>.<param values>.rate/quality`` (pareto, size)."""
    out: dict[str, str] = {}
    name = spec["name"]
    for r, run in collected:
        if run is None:
            continue
        if spec["layout"] == "knn_grid":
            pts = dig(run.results, "metrics.knn_grid.points") or []
            if pts:
                best = min(pts, key=lambda p: p["perplexity"])
                out.update({f"{name}.best_k": str(best["k"]), f"{name}.best_lmbda": f"{best['lmbda']:g}",
                            f"{name}.best_perplexity": f"{best['perplexity']:.2f}",
                            f"{name}.perplexity_none": fmt_num(dig(run.results, "metrics.perplexity.perplexity_none"))})
                ctl = dig(run.config, "strategy.control", {})
                own = [p for p in pts if p["k"] == ctl.get("k") and p["lmbda"] == ctl.get("lmbda")]
                if own:  # the grid's arithmetic against the control's own, at the preset's (k, λ)
                    out[f"{name}.at_preset"] = f"{own[0]['perplexity']:.4f}"
                    out[f"{name}.run_perplexity"] = fmt_num(dig(run.results, "metrics.perplexity.perplexity"), 4)
            continue
        tag = "_".join(override_value(v) for v in r.point.params.values()) or "run"
        base = f"{name}.{r.point.key}" + (f".{r.point.group}" if r.point.group else "") + f".{tag}"
        q = quality(run.results)
        out[f"{base}.rate"] = fmt_rate(retrieval_rate(run.results))
        out[f"{base}.quality"] = fmt_num(q.value if q else None, 3 if is_qa(run.results) else 2)
        out[f"{base}.entries"] = fmt_int(dig(run.results, "datastore.size"))
        if spec["layout"] == "ttft":
            ttft = time_to_first_token(run.results)
            out[f"{base}.ttft"] = MISSING if ttft is None else f"{ttft * 1000:.0f} ms"
            out[f"{base}.answer_in_output"] = fmt_num(answer_in_output(run.results), 3)
        if not is_qa(run.results):
            out[f"{base}.change"] = fmt_ci(lm_change(run.results), digits=1, pct=True)
    return out


def _save(fig, out_stem: Path) -> list[Path]:
    """PNG and PDF with fixed metadata (no dates), so the same data gives the same files."""
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "ModDate": None, "Producer": None,
                                                         "Creator": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.hashsalt": "rcd", "pdf.fonttype": 42})
    return plt.subplots(figsize=(4.6, 3.2))


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no finished runs yet\n({what})", ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def fig_knn_grid(title: str, runs: Sequence[Run], out_stem: Path) -> list[Path]:
    """Figure 1: perplexity vs λ, one line per k, from a run of :func:`lm_knn_grid`."""
    fig, ax = _figure()
    run = next((r for r in runs if dig(r.results, "metrics.knn_grid.points")), None)
    if run is None:
        _no_data(ax, "kNN-LM λ × k grid")
    else:
        pts = dig(run.results, "metrics.knn_grid.points")
        for k in sorted({p["k"] for p in pts}):
            ps = sorted((p for p in pts if p["k"] == k), key=lambda p: p["lmbda"])
            x = [p["lmbda"] for p in ps]
            ax.plot(x, [p["perplexity"] for p in ps], marker="o", ms=3, label=f"k = {k}")
            ax.fill_between(x, [p["ci_low"] for p in ps], [p["ci_high"] for p in ps], alpha=0.12)
        base = dig(run.results, "metrics.perplexity.perplexity_none")
        if base:
            ax.axhline(base, color="grey", ls="--", lw=1, label="none (λ = 0)")
        ax.set_xlabel("λ (weight of p_kNN)")
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def pareto_front(points: Sequence[tuple[float, float]], lower_is_better: bool = True) -> list[tuple[float, float]]:
    """Points not dominated by another with lower-or-equal cost (x) and better-or-equal quality (y), by x."""
    front: list[tuple[float, float]] = []
    best = math.inf if lower_is_better else -math.inf
    for x, y in sorted(points, key=lambda p: (p[0], p[1] if lower_is_better else -p[1])):
        if (y < best) if lower_is_better else (y > best):
            front.append((x, y))
            best = y
    return front


def fig_pareto(title: str, series: Sequence[tuple[str, list[tuple[Resolved, Run]]]], out_stem: Path) -> list[Path]:
    """Figure 2: quality vs retrieval rate, one line per series (e.g. adaptive θ, fixed strides)."""
    fig, ax = _figure()
    allpts: list[tuple[float, float]] = []
    qa = False
    base = None
    for label, pts in series:
        xy = []
        for r, run in pts:
            q, rate = quality(run.results), retrieval_rate(run.results)
            if q is None or rate is None:
                continue
            qa = qa or is_qa(run.results)
            if base is None and not is_qa(run.results):
                base = dig(run.results, "metrics.perplexity.perplexity_none")
            tag = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in r.point.params.items())
            xy.append((rate, q.value, tag))
        if not xy:
            continue
        xy.sort()
        ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o", ms=4, label=label)
        for x, y, tag in xy:
            if tag:
                ax.annotate(tag.split("=", 1)[-1], (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        allpts += [(x, y) for x, y, _ in xy]
    if not allpts:
        _no_data(ax, "retrieval-rate sweep")
    else:
        if base:
            ax.scatter([0.0], [base], color="black", marker="s", s=16, label="none", zorder=3)
            allpts.append((0.0, base))
        front = pareto_front(allpts, lower_is_better=not qa)
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="black", lw=0.8, alpha=0.5,
                label="Pareto front")
        ax.set_xlabel("retrieval rate (share of tokens that retrieve)")
        ax.set_ylabel("exact match" if qa else "perplexity")
        # below the axes: the points run corner to corner and every corner holds a label
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def fig_size(title: str, series: Sequence[tuple[str, list[tuple[Resolved, Run]]]], out_stem: Path) -> list[Path]:
    """Figure 3: quality vs datastore entries (log x): exact match (QA) or the perplexity change against
    the plain model on the same tokens, in %, with its paired 95% interval (lm)."""
    fig, ax = _figure()
    any_pts = False
    qa = False
    for label, pts in series:
        xy = []
        for _r, run in pts:
            n = dig(run.results, "datastore.size")
            if is_qa(run.results):
                q = exact_match(run.results)
                qa = True
            else:
                c = lm_change(run.results)
                q = None if c is None else Estimate(100 * c.value, None if c.low is None else 100 * c.low,
                                                    None if c.high is None else 100 * c.high)
            if q is None or not n:
                continue
            xy.append((n, q))
        if not xy:
            continue
        any_pts = True
        xy.sort(key=lambda p: p[0])
        x = [p[0] for p in xy]
        y = [p[1].value for p in xy]
        lo = [p[1].value - (p[1].low if p[1].low is not None else p[1].value) for p in xy]
        hi = [(p[1].high if p[1].high is not None else p[1].value) - p[1].value for p in xy]
        ax.errorbar(x, y, yerr=[lo, hi], marker="o", ms=4, capsize=2, label=label)
    if not any_pts:
        _no_data(ax, "datastore-size sweep")
    else:
        if not qa:
            ax.axhline(0.0, color="grey", ls="--", lw=1, label="none")
        ax.set_xscale("log")
        ax.set_xlabel("datastore entries")
        ax.set_ylabel("exact match" if qa else "perplexity change vs none (%)")
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    return _save(fig, out_stem)


def fig_ttft(title: str, series: Sequence[tuple[str, list[tuple[Resolved, Run]]]], out_stem: Path) -> list[Path]:
    """Quality (answer in output; perplexity for lm runs) against time to first token, one panel per
    group (data set), one line per series, each point annotated with its sweep value."""
    import matplotlib.pyplot as plt

    groups: dict[Optional[str], list] = {}
    for label, pts in series:
        groups.setdefault(pts[0][0].point.group if pts else None, []).append((label, pts))
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(4.2 * max(1, len(groups)), 3.2), squeeze=False)
    for ax, (group, members) in zip(axes[0], groups.items() or [(None, [])]):
        drawn = False
        for label, pts in members:
            xy = []
            for r, run in pts:
                x = time_to_first_token(run.results)
                y = answer_in_output(run.results) if is_qa(run.results) else dig(
                    run.results, "metrics.perplexity.perplexity")
                if x is None or y is None:
                    continue
                xy.append((x, y, ", ".join(override_value(v) for v in r.point.params.values())))
            if not xy:
                continue
            xy.sort()
            ax.plot([p[0] for p in xy], [p[1] for p in xy], marker="o" if len(xy) > 1 else "*",
                    ms=4 if len(xy) > 1 else 9, label=label.replace(f" ({group})", "") if group else label)
            for x, y, tag in xy:
                if tag:
                    ax.annotate(tag, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            drawn = True
        if not drawn:
            _no_data(ax, "runs")
            continue
        ax.set_xlabel("time to first token (s)")
        ax.set_ylabel("answer in output" if any(is_qa(run.results) for _, pts in members for _, run in pts)
                      else "perplexity")
        ax.set_title(group or "", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, out_stem)


def build_figure(spec: dict, collected: Sequence[tuple[Resolved, Optional[Run]]], out_stem: Path) -> list[Path]:
    done = [(r, run) for r, run in collected if run is not None]
    series: dict[str, tuple[str, list]] = {}
    for r, run in done:
        key = r.point.key + (f" ({r.point.group})" if r.point.group else "")
        label = (r.point.entry_label or r.point.label) + (f" ({r.point.group})" if r.point.group else "")
        series.setdefault(key, (label, []))[1].append((r, run))
    title = spec["title"]
    layout = spec["layout"]
    if layout == "knn_grid":
        return fig_knn_grid(title, [run for _, run in done], out_stem)
    if layout == "pareto":
        return fig_pareto(title, list(series.values()), out_stem)
    if layout == "size":
        return fig_size(title, list(series.values()), out_stem)
    if layout == "ttft":
        return fig_ttft(title, list(series.values()), out_stem)
    raise ValueError(f"{spec['name']}: unknown figure layout {layout!r} (knn_grid, pareto, size, ttft)")
