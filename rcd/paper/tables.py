"""Paper tables: formatting of numbers and intervals, the table layouts (lm, qa, cost, presets,
scales), Markdown and LaTeX, and the ``{{key}}`` values a table gives the paper text."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence


from rcd.paper.experiments import (CONF, MISSING, SCALES, Resolved, Run, at_scale, compose, dig, grid_axes, grid_cell,
                                   override_value)
from rcd.paper.stats import (Estimate, answer_in_output, datastore_build_seconds, exact_match, is_baseline, lm_change,
                             lm_perplexity, qa_metrics, retrieval_rate, throughput_ratio, time_to_first_token,
                             token_f1, tokens_per_second)


def fmt_num(x: Optional[float], digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return MISSING
    return f"{x:,.{digits}f}"


def fmt_ci(e: Optional[Estimate], digits: int = 2, scale: float = 1.0, pct: bool = False) -> str:
    """``12.34 [11.90, 12.80]``; ``pct=True``: ``-12.3% [-13.0, -11.6]``."""
    if e is None:
        return MISSING
    f = (lambda v: f"{v * 100:+.{digits}f}") if pct else (lambda v: f"{v * scale:.{digits}f}")
    s = f(e.value) + ("%" if pct else "")
    if e.low is not None and e.high is not None:
        s += f" [{f(e.low)}, {f(e.high)}]"
    return s


def fmt_rate(x: Optional[float]) -> str:
    """A rate in [0, 1]: 3 decimals, or 2 significant digits below 0.01 (one retrieval in 2,047
    tokens is ``0.00049``, not ``0.000``)."""
    if x is None:
        return MISSING
    if 0 < x < 0.01:
        return f"{x:.2g}" if x >= 1e-4 else f"{x:.1e}"
    return f"{x:.3f}"


def fmt_int(x: Optional[float]) -> str:
    return MISSING if x is None else f"{int(x):,}"


@dataclass
class Table:
    """A titled table of strings, written as Markdown or as a LaTeX ``table``."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)
    label: str = ""
    #: values of the whole table for the paper's prose (``<experiment>.<key>``), beside the per-cell ones
    values: dict[str, str] = field(default_factory=dict)

    def markdown(self) -> str:
        cells = [self.columns] + self.rows
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out = [f"**{self.title}**", "", line(self.columns), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        for note in self.notes:
            out += ["", note]
        return "\n".join(out) + "\n"

    def latex(self) -> str:
        spec = "l" * len(self.columns)
        out = ["\\begin{table}[t]", "\\centering", "\\small", "\\resizebox{\\linewidth}{!}{%",
               f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
               " & ".join(latex_escape(c) for c in self.columns) + " \\\\", "\\midrule"]
        out += [" & ".join(latex_escape(c) for c in r) + " \\\\" for r in self.rows]
        out += ["\\bottomrule", "\\end{tabular}}"]
        title = self.title if self.title.endswith(".") else self.title + "."
        caption = " ".join(latex_escape(t) for t in [title] + list(self.notes))
        out.append(f"\\caption{{{caption}}}")
        if self.label:
            out.append(f"\\label{{tab:{self.label}}}")
        out.append("\\end{table}")
        return "\n".join(out) + "\n"
_LATEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
          "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "–": "--", "λ": r"$\lambda$",
          "θ": r"$\theta$", "×": r"$\times$", "÷": r"$\div$", "·": r"$\cdot$", "Δ": r"$\Delta$", "≤": r"$\leq$", "−": "-",
          "`": ""}


def latex_escape(s: str) -> str:
    s = re.sub(r"\*\*(.+?)\*\*", r"\1", s)  # Markdown bold in titles
    return "".join(_LATEX.get(ch, ch) for ch in s)


@dataclass
class Row:
    """A table row's identity and its run (None if missing)."""

    key: str
    label: str
    group: Optional[str]
    run: Optional[Run]


def _with_runs(rows: Sequence[Row], cols: Sequence[str], out: list):
    """(row, its results) for rows that have a run; a row without one gets a line of "–" in ``out``."""
    for r in rows:
        if r.run is None:
            out.append([r.label] + [MISSING] * (len(cols) - 1))
        else:
            yield r, r.run.results


def lm_table(title: str, rows: Sequence[Row], label: str = "") -> Table:
    """Table 1 layout: perplexity [CI], change vs plain [paired CI], bits/byte, retrieval rate, speed, TTFT."""
    cols = ["strategy", "what · how · when", "perplexity [95% CI]", "Δ vs none [95% CI]", "bits/byte",
            "retrieval rate", "decode tok/s", "time to 1st tok (s)", "tok/s ÷ none", "datastore entries"]
    out: list = []
    for r, res in _with_runs(rows, cols, out):
        base = is_baseline(res)
        p = dig(res, "metrics.perplexity", {})
        out.append([
            r.label,
            grid_cell(r.run.config),
            fmt_ci(lm_perplexity(res)),
            MISSING if base else fmt_ci(lm_change(res), digits=1, pct=True),
            fmt_num(p.get("bits_per_byte_none") if base else p.get("bits_per_byte"), 4),
            fmt_rate(retrieval_rate(res)),
            fmt_num(tokens_per_second(res), 1),
            fmt_num(time_to_first_token(res), 3),
            fmt_num(throughput_ratio(res), 2),
            fmt_int(dig(res, "datastore.size")),
        ])
    notes = ["Perplexity: exp of the mean token NLL; interval = bootstrap over tokens (1000 resamples, seed 0). "
             "Δ: paired bootstrap of ppl/ppl_none − 1 on the same tokens. Speed: decode tokens/s and time to the "
             "first generated token at batch 1 (no interval; varies run to run), ÷ none measured in the same process. "
             "– = not run / not available."]
    scored, values = scored_text([r for r in rows if r.run is not None])
    if scored:
        notes.append(scored)
    return Table(title, cols, out, notes, label, values)


def scored_text(rows: Sequence[Row]) -> tuple[str, dict[str, str]]:
    """The note naming the documents and token counts the rows scored (from each run's
    ``metrics.perplexity``), and its values; rows that scored different texts are named, never pooled."""
    texts: dict[tuple, list[str]] = {}
    for r in rows:
        p = dig(r.run.results, "metrics.perplexity", {}) or {}
        docs = tuple((d.get("id"), d.get("tokens")) for d in p.get("documents") or [])
        texts.setdefault((p.get("tokens"), docs), []).append(r.label)
    if not texts:
        return "", {}

    def say(tokens, docs) -> str:
        return f"{fmt_int(tokens)} tokens" + (f" ({', '.join(f'{i}: {fmt_int(n)}' for i, n in docs)})" if docs else "")

    if len(texts) == 1:
        (tokens, docs), = texts
        return (f"Scored text, the same tokens in every row: {say(tokens, docs)}.",
                {"scored_tokens": fmt_int(tokens), "scored_documents": str(len(docs))})
    parts = "; ".join(f"{', '.join(labels)}: {say(t, d)}" for (t, d), labels in texts.items())
    return f"Rows scored different texts (compare within a group only): {parts}.", {}


def qa_table(title: str, rows: Sequence[Row], groups: dict[str, str], label: str = "") -> Table:
    """Table 2 layout: one block of rows per data set: EM [CI], F1, answer in output, recall, retrieval rate,
    TTFT, tokens/s."""
    cols = ["data set", "strategy", "exact match [95% CI]", "F1", "answer in output", "recall", "retrieval rate",
            "time to 1st tok (s)", "decode tok/s"]
    out = []
    for r in rows:
        g = groups.get(r.group, r.group or MISSING)
        if r.run is None:
            out.append([g, r.label] + [MISSING] * (len(cols) - 2))
            continue
        res = r.run.results
        q = qa_metrics(res)
        f1 = token_f1(res)
        out.append([
            g, r.label,
            fmt_ci(exact_match(res), digits=3),
            fmt_num(f1.value if f1 else None, 3),
            fmt_num(answer_in_output(res), 3),
            fmt_num(q.get("recall"), 3),
            fmt_rate(retrieval_rate(res)),
            fmt_num(time_to_first_token(res), 3),
            fmt_num(tokens_per_second(res), 1),
        ])
    notes = ["Exact match (0–1) with a bootstrap interval over questions (1000 resamples, seed 0). "
             "Answer in output: share of questions whose first output line contains a reference answer as whole "
             "words after SQuAD normalisation (answer containment, as in DPR / PopQA). "
             "Speed columns have no interval and vary run to run. – = not run / not available."]
    return Table(title, cols, out, notes, label)


def cost_table(title: str, rows: Sequence[Row], label: str = "") -> Table:
    """Cost per strategy: decode speed, time to first token, datastore size on disk and build/load time."""
    cols = ["strategy", "decode tok/s", "tok/s ÷ none", "time to 1st tok (s)", "datastore entries",
            "datastore MB", "datastore build, once (s)", "datastore load in run (s)", "run total (s)"]
    out: list = []
    for r, res in _with_runs(rows, cols, out):
        b = dig(res, "datastore.bytes")
        out.append([
            r.label,
            fmt_num(tokens_per_second(res), 1),
            fmt_num(throughput_ratio(res), 2),
            fmt_num(time_to_first_token(res), 3),
            fmt_int(dig(res, "datastore.size")),
            fmt_num(b / 2**20 if b is not None else None, 1),
            fmt_num(datastore_build_seconds(res), 1),
            fmt_num(dig(res, "timing.datastore_s") if res.get("datastore") else None, 1),
            fmt_num(dig(res, "timing.total_s"), 1),
        ])
    notes = ["Timings are wall-clock seconds on the machine that ran the row and vary run to run. "
             "Build, once: from the datastore's manifest (built by the first run that needed it, then cached); "
             "load in run: the run's own datastore time, which includes the build when it found none cached."]
    return Table(title, cols, out, notes, label)


def rows_of(collected: Sequence[tuple[Resolved, Optional[Run]]]) -> list[Row]:
    return [Row(r.point.key, r.point.label, r.point.group, run) for r, run in collected]


def build_table(spec: dict, rows: Sequence[Row]) -> Table:
    layout = spec["layout"]
    if layout == "lm":
        return lm_table(spec["title"], rows, spec["name"])
    if layout == "qa":
        groups = {g["key"]: g.get("label", g["key"]) for g in spec.get("groups") or []}
        return qa_table(spec["title"], rows, groups, spec["name"])
    if layout == "cost":
        return cost_table(spec["title"], rows, spec["name"])
    raise ValueError(f"{spec['name']}: unknown table layout {layout!r} (lm, qa, cost)")


def table_values(spec: dict, rows: Sequence[Row], table: Table) -> dict[str, str]:
    """``<experiment>.<row key>[.<group>].<column index name>`` -> cell, for the paper's prose."""
    out = {}
    keys = [re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in table.columns]
    for r, cells in zip(rows, table.rows):
        base = f"{spec['name']}.{r.key}" + (f".{r.group}" if r.group else "")
        for k, c in zip(keys, cells):
            out[f"{base}.{k}"] = c
    out.update({f"{spec['name']}.{k}": v for k, v in table.values.items()})
    return out


def presets_table(title: str, conf_dir: Path = CONF) -> Table:
    """Every preset in ``conf/strategy/*.yaml`` with the grid cell it composes to (read from config)."""
    from omegaconf import OmegaConf

    rows = []
    for f in sorted((conf_dir / "strategy").glob("*.yaml")):
        head = []  # the preset file's leading comment block, as one line
        for ln in f.read_text().splitlines():
            if not ln.startswith("#"):
                break
            head.append(ln.lstrip("#").strip())
        first = " ".join(head)
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        try:
            cfg = OmegaConf.to_container(compose([f"+strategy={f.stem}"]), resolve=False)
            axes = grid_axes(cfg) or (MISSING, MISSING, MISSING)
        except (HydraException, OmegaConfBaseException, ValueError) as e:  # say so instead of failing the table
            axes = (MISSING, MISSING, f"(does not compose: {str(e).splitlines()[0][:60]})")
        rows.append([f.stem, *axes, first])
    notes = ["Generated from `conf/strategy/*.yaml`: what = datastore unit, how = control class, "
             "when = schedule class (with the preset's n / θ); the description is the preset file's leading comment."]
    return Table(title, ["preset", "what", "how", "when", "description"], rows, notes, "presets")


def scales_table(title: str, specs: Sequence[dict]) -> Table:
    """The overrides each experiment adds at each scale (what "small" and "full" mean)."""
    rows = []
    for spec in specs:
        if not (spec.get("rows") or spec.get("series")):
            continue
        cells = []
        for scale in SCALES:
            common = list(at_scale(spec.get("scales", {}), scale) or [])
            cell = " ".join(f"`{o}`" for o in common) or "defaults"
            per_row: dict[str, list[str]] = {}
            for e in spec.get("rows") or spec.get("series") or []:
                for o in at_scale(e.get("scales", {}), scale) or []:
                    per_row.setdefault(o, []).append(e["key"])
                sweep = {k: at_scale(v, scale) for k, v in (e.get("sweep") or {}).items()}
                for k, v in sweep.items():
                    per_row.setdefault(f"{k}∈{{{', '.join(override_value(x) for x in v)}}}", []).append(e["key"])
                if scale in (e.get("skip_scales") or []):
                    per_row.setdefault("not run", []).append(e["key"])
            for o, keys in per_row.items():
                cell += f"; `{o}` ({', '.join(keys)})"
            cells.append(cell)
        rows.append([f"`{spec['name']}`", spec["title"].split(".")[0], *cells])
    return Table(title, ["experiment", "for", "small", "full"], rows,
                 ["Overrides that only some rows add name those rows in parentheses; `k∈{…}` is a sweep (one run per value)."], "scales")


def config_values(overrides: Sequence[str], prefix: str = "conf") -> dict[str, str]:
    """Scalar leaves of the composed config as ``conf.<dotted path>`` -> value, so the paper's
    prose quotes settings from the config rather than by hand ({} if it does not compose)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.to_container(compose(overrides), resolve=True)
    except (HydraException, OmegaConfBaseException, ValueError):
        return {}
    out: dict[str, str] = {}

    def walk(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif not isinstance(node, list):
            out[path] = override_value(node)

    walk(cfg, prefix)
    return out
