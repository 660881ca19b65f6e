"""rcd.paper (experiments, stats, tables, figures, render), the lm_knn_grid task and scripts/paper.py: bootstrap CIs, experiment specs -> run folders, tables from fixture
runs, figures, paper rendering, the Figure 1 grid task, and resume (finished runs skipped) end to end."""
import importlib.util
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_run_files
from rcd.identity import source_fingerprint
from rcd.paper import experiments, figures, render, stats, tables
from rcd.tasks import knn_grid
from rcd.metrics import bootstrap_ci

FIX = Path(__file__).resolve().parent / "fixtures" / "runs"
REPO = Path(__file__).resolve().parents[1]
NLL_NONE = [3.2, 1.1, 0.4, 2.7, 5.0, 0.9, 1.8, 3.9, 0.2, 2.4, 4.1, 1.3]
NLL = [2.9, 1.0, 0.5, 2.1, 4.6, 0.9, 1.5, 3.6, 0.2, 2.3, 3.8, 1.4]


def paper_script():
    spec = importlib.util.spec_from_file_location("paper_script", REPO / "scripts" / "paper.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------ statistics
def test_bootstrap_ci_on_a_fixed_sample():
    assert bootstrap_ci(NLL_NONE) == pytest.approx((2.2499999999999996, 1.4164583333333334, 3.1166666666666667),
                                                   rel=1e-12)
    e = stats.perplexity_ci(NLL_NONE)  # exp of the mean NLL and of its interval
    assert (e.value, e.low, e.high) == pytest.approx((math.exp(2.25), math.exp(1.4164583333333334),
                                                      math.exp(3.1166666666666667)), rel=1e-12)
    d = stats.relative_change_ci(NLL, NLL_NONE)  # paired: resamples token differences
    m, lo, hi = bootstrap_ci(np.subtract(NLL, NLL_NONE))
    assert (d.value, d.low, d.high) == pytest.approx((math.expm1(m), math.expm1(lo), math.expm1(hi)), rel=1e-12)
    assert d.value == pytest.approx(math.exp(np.mean(NLL)) / math.exp(np.mean(NLL_NONE)) - 1, rel=1e-12)
    assert tables.fmt_ci(d, digits=1, pct=True) == "-16.8% [-26.5, -5.7]"
    assert [tables.fmt_rate(x) for x in (1 / 2047, 0.25, 0.0, None)] == ["0.00049", "0.250", "0.000", "–"]
    assert stats.mean_ci([1, 0, 1, 1]) == stats.mean_ci([1, 0, 1, 1])  # seeded: same interval every time
    with pytest.raises(ValueError, match="differ in length"):
        stats.relative_change_ci([1.0], [1.0, 2.0])


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 20.0), (0.5, 21.0), (0.25, 25.0), (0.5, 24.0), (0.0, 30.0), (0.75, 22.0)]
    assert figures.pareto_front(pts) == [(0.0, 30.0), (0.25, 25.0), (0.5, 21.0), (1.0, 20.0)]
    assert figures.pareto_front([(0.0, 0.2), (0.5, 0.5), (1.0, 0.4)], lower_is_better=False) == [(0.0, 0.2), (0.5, 0.5)]


# ------------------------------------------------------------------------------ tables from fixtures
def fixture_rows():
    lm = FIX / "lm"
    return [tables.Row("none", "none", None, experiments.load_run(lm / "none-lm-0a1b2c3d4e")),
            tables.Row("per_token", "per_token (kNN-LM)", None, experiments.load_run(lm / "per_token-lm-5f6a7b8c9d")),
            tables.Row("every_n_4", "every_n (s=4)", None, experiments.load_run(lm / "every_n-lm-1122334455"))]


LM_MD = """\
**Table 1. Test**

| strategy           | what · how · when                      | perplexity [95% CI] | Δ vs none [95% CI]   | bits/byte | retrieval rate | decode tok/s | time to 1st tok (s) | tok/s ÷ none | datastore entries |
|--------------------|----------------------------------------|---------------------|----------------------|-----------|----------------|--------------|---------------------|--------------|-------------------|
| none               | –                                      | 9.49 [4.12, 22.57]  | –                    | 0.8115    | 0.000          | 12.5         | 0.081               | 1.00         | –                 |
| per_token (kNN-LM) | tokens · KNNInterpolation · EveryToken | 7.90 [3.82, 17.16]  | -16.8% [-26.5, -5.7] | 0.7454    | 1.000          | 9.0          | 0.095               | 0.75         | 100,000           |
| every_n (s=4)      | –                                      | –                   | –                    | –         | –              | –            | –                   | –            | –                 |

Perplexity: exp of the mean token NLL; interval = bootstrap over tokens (1000 resamples, seed 0). Δ: paired bootstrap of ppl/ppl_none − 1 on the same tokens. Speed: decode tokens/s and time to the first generated token at batch 1 (no interval; varies run to run), ÷ none measured in the same process. – = not run / not available.

Scored text, the same tokens in every row: 12 tokens.
"""


def test_lm_table_from_fixture_run_folders():
    rows = fixture_rows()
    assert rows[2].run is None  # config.yaml but no results.json: an unfinished run counts as missing
    assert tables.lm_table("Table 1. Test", rows).markdown() == LM_MD
    # the LaTeX table has the same columns and cells
    tex = tables.lm_table("Table 1. Test", rows).latex()
    assert "decode tok/s & time to 1st tok (s) & tok/s $\\div$ none" in tex
    assert "12.5 & 0.081 & 1.00" in tex and "9.0 & 0.095 & 0.75" in tex
    # a run whose generation has no time to first token renders "–"
    del rows[1].run.results["metrics"]["generation"]["per_token"]["time_to_first_token"]
    assert tables.lm_table("T", rows).rows[1][6:9] == ["9.0", "–", "0.75"]


def test_latex_table_escapes_and_wraps():
    t = tables.Table("Table 9. A_b", ["strategy", "Δ %"], [["per_token", "–"], ["x & y", "λ=0.1"]], ["Note."], "t9")
    assert t.latex() == (
        "\\begin{table}[t]\n\\centering\n\\small\n\\resizebox{\\linewidth}{!}{%\n\\begin{tabular}{ll}\n\\toprule\n"
        "strategy & $\\Delta$ \\% \\\\\n\\midrule\nper\\_token & -- \\\\\nx \\& y & $\\lambda$=0.1 \\\\\n"
        "\\bottomrule\n\\end{tabular}}\n\\caption{Table 9. A\\_b. Note.}\n\\label{tab:t9}\n\\end{table}\n")


def test_cost_table_from_fixture_run_folders(tmp_path):
    rows = fixture_rows()
    md = tables.cost_table("Cost", rows).markdown().splitlines()
    assert md[4] == ("| none               | 12.5         | 1.00         | 0.081               | –                 | –  "
                     "          | –                         | –                         | 30.2          |")
    assert md[5] == ("| per_token (kNN-LM) | 9.0          | 0.75         | 0.095               | 100,000           | 120"
                     ".0        | –                         | 210.5                     | 250.0         |")
    # the one-time build time comes from the datastore's manifest when the datastore is on this machine
    (tmp_path / "manifest.json").write_text(json.dumps({"build_seconds": 534.07}))
    rows[1].run.results["datastore"]["folder"] = str(tmp_path)
    assert tables.cost_table("Cost", rows).rows[1][6:8] == ["534.1", "210.5"]


QA_RES = {
    "metrics": {"qa": {"exact_match": 0.5, "f1": 0.625, "contains": 0.75, "recall": 0.75, "retrieval_rate": 0.25,
                       "tokens_per_second": 11.25, "time_to_first_token": 0.1234}},
    "per_example": {"em": [1, 0, 1, 0], "f1": [1.0, 0.5, 1.0, 0.0], "contains": [1.0, 1.0, 1.0, 0.0]},
    "run": {"strategy": "once"}, "datastore": {"unit": "chunks", "size": 2000}, "timing": {"total_s": 5.0}}


def test_qa_table_with_groups_and_missing_metrics():
    run = experiments.Run(Path("x"), QA_RES, {})
    partial = experiments.Run(Path("y"), {"metrics": {"qa": {"exact_match": 0.25}}, "run": {"strategy": "adaptive"}}, {})
    rows = [tables.Row("once", "once", "wordnet", run), tables.Row("adaptive", "adaptive", "wordnet", partial),
            tables.Row("once", "once", "mendeleev", None)]
    t = tables.qa_table("Table 2. QA", rows, {"wordnet": "WordNet years", "mendeleev": "mendeleev"})
    assert t.columns[2:5] == ["exact match [95% CI]", "F1", "answer in output"]
    # "answer in output" is metrics.qa.contains; "–" for runs made before it was recorded
    assert t.rows == [
        ["WordNet years", "once", "0.500 [0.000, 1.000]", "0.625", "0.750", "0.750", "0.250", "0.123", "11.2"],
        ["WordNet years", "adaptive", "0.250", "–", "–", "–", "–", "–", "–"],
        ["mendeleev", "once", "–", "–", "–", "–", "–", "–", "–"],
    ]
    assert "F1 & answer in output & recall" in t.latex() and "0.625 & 0.750 & 0.750 & 0.250" in t.latex()
    vals = tables.table_values({"name": "table2_qa"}, rows, t)
    assert vals["table2_qa.once.wordnet.answer_in_output"] == "0.750"
    assert stats.retrieval_rate({"metrics": {"qa": {}}, "run": {"strategy": "none"}}) == 0.0


def test_table_values_name_cells_for_the_paper():
    spec = {"name": "table1_perplexity"}
    rows = fixture_rows()
    vals = tables.table_values(spec, rows, tables.lm_table("T", rows))
    assert vals["table1_perplexity.per_token.perplexity_95_ci"] == "7.90 [3.82, 17.16]"
    assert vals["table1_perplexity.per_token.vs_none_95_ci"] == "-16.8% [-26.5, -5.7]"
    assert vals["table1_perplexity.every_n_4.tok_s_none"] == "–"


# ------------------------------------------------------------------------------ specs, points, folders
SPEC = {
    "name": "exp", "title": "T", "kind": "table", "layout": "lm",
    "scales": {"small": ["task.eval_tokens=64"], "full": ["task.eval_tokens=null"]},
    "rows": [
        {"key": "none", "overrides": ["+strategy=none"]},
        {"key": "knn", "label": "kNN", "overrides": ["+strategy=per_token"],
         "scales": {"full": ["datastore.max_tokens=null"]},
         "sweep": {"strategy.control.k": {"small": [8, 16], "full": [256]}, "strategy.control.lmbda": [0.1, 0.2]}},
        {"key": "later", "overrides": ["+strategy=no_such_preset"], "skip_scales": ["full"]},
    ],
}


def test_entries_expand_scales_and_sweeps():
    es = experiments.entries(SPEC, "small")
    assert [e.key for e in es] == ["none", "knn", "later"]
    assert es[1].multirun_overrides() == ["task.eval_tokens=64", "+strategy=per_token", "strategy.control.k=8,16",
                                          "strategy.control.lmbda=0.1,0.2"]
    pts = es[1].points()
    assert [p.params for p in pts] == [{"strategy.control.k": 8, "strategy.control.lmbda": 0.1},
                                       {"strategy.control.k": 8, "strategy.control.lmbda": 0.2},
                                       {"strategy.control.k": 16, "strategy.control.lmbda": 0.1},
                                       {"strategy.control.k": 16, "strategy.control.lmbda": 0.2}]
    assert pts[1].label == "kNN (k=8, lmbda=0.2)" and pts[1].entry_label == "kNN"
    assert pts[1].overrides == ["task.eval_tokens=64", "+strategy=per_token", "strategy.control.k=8",
                                "strategy.control.lmbda=0.2"]
    full = experiments.entries(SPEC, "full")
    assert [e.key for e in full] == ["none", "knn"]
    assert full[1].overrides == ["task.eval_tokens=null", "+strategy=per_token", "datastore.max_tokens=null"]
    assert experiments.override_value(None) == "null" and experiments.override_value([1, 0.5, True]) == "[1,0.5,true]"
    with pytest.raises(ValueError, match="scale must be one of"):
        experiments.entries(SPEC, "medium")


def test_run_folder_naming_is_stable_under_override_and_key_order(tmp_path):
    a = experiments.Point("exp", "knn", "kNN", None, ["+strategy=per_token", "strategy.control.k=8", "task.eval_tokens=64"], {})
    b = experiments.Point("exp", "knn", "kNN", None, ["task.eval_tokens=64", "+strategy=per_token", "strategy.control.k=8"], {})
    ra, rb = experiments.resolve(a, tmp_path), experiments.resolve(b, tmp_path)
    assert ra.error is None and ra.folder == rb.folder
    assert ra.folder.parent == tmp_path and ra.folder.name.startswith("per_token-lm-") and len(ra.folder.name) == 23
    c = experiments.Point("exp", "knn", "kNN", None, ["+strategy=per_token", "strategy.control.k=16", "task.eval_tokens=64"], {})
    assert experiments.resolve(c, tmp_path).folder != ra.folder
    # the hash ignores where runs go, and the config's own key order (sort_keys)
    assert experiments.resolve(a, tmp_path / "elsewhere").folder.name == ra.folder.name


def test_missing_preset_and_refused_cell_are_reported_not_raised(tmp_path):
    r = experiments.resolve(experiments.Point("exp", "later", "later", None, ["+strategy=no_such_preset"], {}), tmp_path)
    assert r.folder is None and r.error == "config not found: strategy/no_such_preset" and not r.done
    r = experiments.resolve(experiments.Point("exp", "x", "x", None, ["+strategy=per_token", "datastore.unit=chunks"], {}),
                       tmp_path)
    assert r.folder is None and "accepts ['tokens']" in r.error


def test_collect_reads_finished_runs_only(tmp_path):
    spec = dict(SPEC, rows=SPEC["rows"][:1])
    [(r, run)] = experiments.collect(spec, "small", tmp_path)
    assert run is None and not r.done
    r.folder.mkdir(parents=True)
    (r.folder / "config.yaml").write_text("strategy: {name: none}\n")
    assert experiments.collect(spec, "small", tmp_path)[0][1] is None  # unfinished
    shutil.copy(FIX / "lm" / "none-lm-0a1b2c3d4e" / "results.json", r.folder / "results.json")
    [(r2, run)] = experiments.collect(spec, "small", tmp_path)
    assert r2.finished and r2.stale and not r2.done  # written by rcd code that recorded no source: run again
    res = json.loads((r.folder / "results.json").read_text())
    res["run"]["code"] = {"source": source_fingerprint()}
    (r.folder / "results.json").write_text(json.dumps(res))
    [(r2, run)] = experiments.collect(spec, "small", tmp_path)
    assert r2.done and run.results["per_example"]["nll_none"] == NLL_NONE


# ------------------------------------------------------------------------------ figures and paper
def test_figures_write_png_and_pdf_deterministically(tmp_path):
    rows = fixture_rows()
    pts = [(experiments.Resolved(experiments.Point("f", "knn", "kNN", None, [], {"datastore.max_tokens": n}), None), r.run)
           for n, r in zip([1000, 100000], rows[:2])]
    spec = {"name": "f", "title": "F", "layout": "size"}
    paths = figures.build_figure(spec, pts, tmp_path / "a" / "f")
    assert [p.name for p in paths] == ["f.png", "f.pdf"] and all(p.stat().st_size > 1000 for p in paths)
    again = figures.build_figure(spec, pts, tmp_path / "b" / "f")
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    for layout in ("pareto", "knn_grid"):
        assert figures.build_figure(dict(spec, layout=layout), pts, tmp_path / layout)[0].is_file()
    with pytest.raises(ValueError, match="unknown figure layout"):
        figures.build_figure(dict(spec, layout="pie"), pts, tmp_path / "x")


def test_render_paper_includes_files_and_fills_values(tmp_path):
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| a |\n|---|\n| 1 |\n")
    src = "# P\n<!-- include tables/t.md -->\nppl {{t.per_token.ppl}}, {{nope}}\n<!-- include tables/none.md -->\n"
    missing = []
    out = render.render_paper(src, tmp_path, {"t.per_token.ppl": "7.90"}, missing)
    assert out == ("# P\n| a |\n|---|\n| 1 |\nppl 7.90, –\n*(tables/none.md: not generated yet)*\n")
    assert missing == ["tables/none.md", "nope"]


# ------------------------------------------------------------------------------ Figure 1 grid task
def test_knn_grid_nll_matches_the_knn_control():
    from rcd.control.knn import interpolate, knn_log_probs

    g = torch.Generator().manual_seed(0)
    n, v, kmax = 6, 11, 5
    scores = torch.sort(torch.rand(n, kmax, generator=g) * 300, dim=1).values
    tokens = torch.randint(0, v, (n, kmax), generator=g)
    logits = torch.randn(n, v, generator=g)
    targets = torch.randint(0, v, (n,), generator=g)
    lm_lp = torch.log_softmax(logits, -1)
    nll_lm = -lm_lp.gather(1, targets.view(-1, 1)).squeeze(1).double().numpy()
    grid = knn_grid.grid_nll(nll_lm, scores, tokens, targets, [2, 5], [0.0, 0.3], temperature=100.0)
    for k in (2, 5):
        want = -interpolate(lm_lp, knn_log_probs(scores[:, :k], tokens[:, :k], v, 100.0), 0.3)
        assert grid[(k, 0.3)] == pytest.approx(want.gather(1, targets.view(-1, 1)).squeeze(1).numpy(), rel=1e-5)
        assert grid[(k, 0.0)] == pytest.approx(nll_lm, rel=1e-12)


@pytest.fixture
def tiny_overrides(tmp_path):
    return tiny_run_files(tmp_path)["lm"]


def test_knn_grid_task_reproduces_the_runs_own_perplexity(tiny_overrides, tmp_path):
    from rcd.run import execute

    cfg = experiments.compose(["+strategy=per_token", "strategy.control.k=8", "strategy.control.lmbda=0.25",
                               "task=lm_knn_grid", "task.grid_ks=[2,8]", "task.grid_lmbdas=[0,0.25,0.5]",
                               f"runs_root={tmp_path / 'runs'}"] + tiny_overrides)
    res = execute(cfg)
    pts = {(p["k"], p["lmbda"]): p for p in res["metrics"]["knn_grid"]["points"]}
    assert sorted(pts) == [(2, 0.0), (2, 0.25), (2, 0.5), (8, 0.0), (8, 0.25), (8, 0.5)]
    p = res["metrics"]["perplexity"]
    assert pts[(8, 0.25)]["perplexity"] == pytest.approx(p["perplexity"], rel=1e-4)
    assert pts[(2, 0.0)]["perplexity"] == pytest.approx(p["perplexity_none"], rel=1e-9)
    assert pts[(8, 0.25)]["ci_low"] < pts[(8, 0.25)]["perplexity"] < pts[(8, 0.25)]["ci_high"]


# ------------------------------------------------------------------------------ resume, end to end
def test_paper_script_skips_finished_runs_and_reruns_unfinished(tiny_overrides, tmp_path):
    exp = tmp_path / "experiments"
    exp.mkdir()
    spec = {"title": "Table 1. Tiny", "kind": "table", "layout": "lm",
            "scales": {"small": tiny_overrides + ["task.generate=false"]},
            "rows": [{"key": "s", "label": "run", "overrides": [], "sweep": {"+strategy": ["none", "per_token"]}},
                     {"key": "later", "label": "later", "overrides": ["+strategy=no_such_preset"]}]}
    (exp / "tiny.yaml").write_text(json.dumps(spec))
    paper = tmp_path / "paper"
    paper.mkdir()
    (paper / "paper.src.md").write_text("<!-- include tables/tiny.md -->\n")
    mod = paper_script()
    argv = ["all", "--experiments", str(exp), "--runs", str(tmp_path / "runs"), "--out", str(paper)]
    mod.main(argv)
    rec = json.loads((paper / "tables" / "regeneration.json").read_text())["experiments"][0]
    assert (rec["points"], rec["ran"], rec["reused"], rec["failed"]) == (3, 2, 0, 0)
    assert rec["skipped"] == ["later: config not found: strategy/no_such_preset"]
    folders = sorted((tmp_path / "runs" / "tiny").glob("*-lm-*"))
    assert [f.name.split("-")[0] for f in folders] == ["none", "per_token"]
    md = (paper / "tables" / "tiny.md").read_text()
    lines = md.splitlines()
    assert lines[0] == "**Table 1. Tiny**" and len(lines[2:7]) == 5
    assert lines[4].startswith("| run (strategy=none) ") and lines[5].startswith("| run (strategy=per_token) ")
    assert lines[6].startswith("| later ")
    assert lines[6].count("–") == 9
    assert (paper / "paper.md").read_text().splitlines()[1] == lines[0]
    # second pass: the finished run is reused untouched, the unfinished one is run again
    kept = folders[1] / "results.json"
    mtime = kept.stat().st_mtime_ns
    (folders[0] / "results.json").unlink()
    first_nll = json.loads(kept.read_text())["per_example"]
    mod.main(argv)
    rec = json.loads((paper / "tables" / "regeneration.json").read_text())["experiments"][0]
    assert (rec["ran"], rec["reused"], rec["failed"]) == (1, 1, 0)
    assert kept.stat().st_mtime_ns == mtime and (folders[0] / "results.json").is_file()
    assert (paper / "tables" / "tiny.md").read_text() == md  # same runs, same numbers, same table
    assert json.loads(kept.read_text())["per_example"] == first_nll
    # third pass: nothing to run; the log of the pass that last computed runs is kept, outputs unchanged
    log = (paper / "tables" / "regeneration.json").read_text()
    mod.main(argv)
    assert (paper / "tables" / "regeneration.json").read_text() == log
    assert (paper / "tables" / "tiny.md").read_text() == md


def test_scales_table_names_the_overrides_of_each_scale():
    t = tables.scales_table("S", [SPEC, {"name": "cost", "title": "C", "from": ["exp"]}])
    assert t.rows == [["`exp`", "T",
                       "`task.eval_tokens=64`; `strategy.control.k∈{8, 16}` (knn); `strategy.control.lmbda∈{0.1, 0.2}` (knn)",
                       "`task.eval_tokens=null`; `datastore.max_tokens=null` (knn); `strategy.control.k∈{256}` (knn); "
                       "`strategy.control.lmbda∈{0.1, 0.2}` (knn); `not run` (later)"]]


def test_config_values_quote_settings_from_the_composed_config():
    v = tables.config_values(["+strategy=per_token", "strategy.control.k=32", "task.window=64"])
    assert (v["conf.strategy.control.k"], v["conf.task.window"], v["conf.strategy.name"]) == ("32", "64", "per_token")
    assert tables.config_values(["+strategy=no_such_preset"]) == {}


def test_figure_values_for_the_prose():
    grid = {"metrics": {"perplexity": {"perplexity_none": 30.0, "perplexity": 28.0},
                        "knn_grid": {"points": [{"k": 8, "lmbda": 0.1, "perplexity": 28.0},
                                                {"k": 8, "lmbda": 0.2, "perplexity": 27.5},
                                                {"k": 64, "lmbda": 0.1, "perplexity": 27.9}]}}}
    run = experiments.Run(Path("g"), grid, {"strategy": {"control": {"k": 8, "lmbda": 0.1}}})
    pt = experiments.Point("fig1", "per_token", "kNN-LM", None, [], {})
    assert figures.figure_values({"name": "fig1", "layout": "knn_grid"}, [(experiments.Resolved(pt, None), run)]) == {
        "fig1.best_k": "8", "fig1.best_lmbda": "0.2", "fig1.best_perplexity": "27.50", "fig1.perplexity_none": "30.00",
        "fig1.at_preset": "28.0000", "fig1.run_perplexity": "28.0000"}
    lm = fixture_rows()[1].run
    pt = experiments.Point("fig2", "every_n", "every n", None, [], {"strategy.schedule.n": 4})
    assert figures.figure_values({"name": "fig2", "layout": "pareto"}, [(experiments.Resolved(pt, None), lm)]) == {
        "fig2.every_n.4.rate": "1.000", "fig2.every_n.4.quality": "7.90", "fig2.every_n.4.entries": "100,000",
        "fig2.every_n.4.change": "-16.8% [-26.5, -5.7]"}


def test_a_merged_regeneration_counts_overlapping_invocations_once(tmp_path):
    """Two `rcd-paper run --only` invocations that overlapped in time: the merged wall time is the union of
    their intervals (not the sum of run times); an entry from an old record without an interval adds its
    summed run times, and the record says so."""
    from rcd.paper import cli as mod
    out = tmp_path / "tables"

    def rec(names, started, ended, jobs):
        exps = [{"name": n, "points": 1, "ran": 1, "reused": 0, "failed": 0, "skipped": [], "wall_s": 500.0,
                 "cpu_s": 400.0, "started": started, "ended": ended, "jobs": jobs} for n in names]
        return {"scale": "small", "threads": 1, "machine": "m", "experiments": exps, "jobs": jobs,
                "launcher": "basic", "wall_s": ended - started, "wall_kind": "elapsed", "command": "c"}

    mod.write_regeneration(rec(["a"], 1000.0, 2000.0, 1), out)
    mod.write_regeneration(rec(["b", "c"], 1500.0, 2600.0, 2), out, merge=True)  # overlaps a by 500 s
    r = json.loads((out / "regeneration.json").read_text())
    assert [e["name"] for e in r["experiments"]] == ["a", "b", "c"]
    assert (r["wall_s"], r["wall_kind"], r["jobs"], r["cpu_s"]) == (1600.0, "elapsed", "1/2", 1200.0)
    mod.write_regeneration(rec(["d"], 4000.0, 4100.0, 1), out, merge=True)  # a gap: 1600 + 100
    assert json.loads((out / "regeneration.json").read_text())["wall_s"] == 1700.0
    # an experiment logged before intervals existed (old record): its summed run time is added, and named
    old = json.loads((out / "regeneration.json").read_text())
    old["experiments"].append({"name": "e", "points": 1, "ran": 1, "reused": 0, "failed": 0, "skipped": [],
                               "wall_s": 300.0, "cpu_s": 290.0})
    (out / "regeneration.json").write_text(json.dumps(old))
    mod.write_regeneration(rec(["d"], 4000.0, 4100.0, 1), out, merge=True)
    r = json.loads((out / "regeneration.json").read_text())
    assert (r["wall_s"], r["wall_kind"]) == (2000.0, "elapsed + summed run times")
    assert "total wall time (elapsed + summed run times) 2000 s" in (out / "regeneration.md").read_text()
    assert mod.wall_kind({"partial": True}) == "summed run times" and mod.wall_kind({}) == "elapsed"
    assert r["jobs"] == "a varying number of"  # the old entry does not say how many ran at once
    assert mod.runs_at_once({"jobs": 2}) == "2"


def test_the_lm_table_names_the_scored_documents_and_refuses_to_pool_different_texts():
    def run(tokens, docs):
        return experiments.Run(Path("r"), {"metrics": {"perplexity": {
            "tokens": tokens, "documents": [{"id": i, "tokens": n} for i, n in docs]}}}, {})

    same = [tables.Row("a", "A", None, run(8190, [("macbeth", 4095), ("tempest", 4095)])),
            tables.Row("b", "B", None, run(8190, [("macbeth", 4095), ("tempest", 4095)])),
            tables.Row("c", "C", None, None)]  # a row without a run says nothing about the text
    note, values = tables.scored_text([r for r in same if r.run is not None])
    assert note == "Scored text, the same tokens in every row: 8,190 tokens (macbeth: 4,095, tempest: 4,095)."
    assert values == {"scored_tokens": "8,190", "scored_documents": "2"}
    t = tables.Table("T", ["x"], [["1"]], values=values)
    assert tables.table_values({"name": "exp"}, [], t) == {"exp.scored_tokens": "8,190", "exp.scored_documents": "2"}
    mixed = same[:1] + [tables.Row("d", "D", None, run(1023, [("macbeth", 1023)]))]
    note, values = tables.scored_text(mixed)
    assert values == {}
    assert note == ("Rows scored different texts (compare within a group only): A: 8,190 tokens (macbeth: 4,095, "
                    "tempest: 4,095); D: 1,023 tokens (macbeth: 1,023).")


def test_the_grid_cell_names_what_decides_firing():
    cell = lambda sched: experiments.grid_cell({"datastore": {"unit": "chunks"}, "strategy": {  # noqa: E731
        "control": {"_target_": "rcd.control.ContextControl"}, "schedule": sched}})
    assert cell({"_target_": "rcd.schedule.EveryN", "n": 16}) == "chunks · ContextControl · EveryN(n=16)"
    adaptive = {"_target_": "rcd.schedule.Adaptive", "threshold": 0.4, "mode": "max_prob", "target_rate": None}
    assert cell(adaptive) == "chunks · ContextControl · Adaptive(threshold=0.4)"
    # θ fitted to a target rate: the configured threshold is not what ran
    assert cell(dict(adaptive, target_rate=0.0625)) == "chunks · ContextControl · Adaptive(target_rate=0.0625)"
    sentence = {"_target_": "rcd.schedule.Sentence", "boundary": ".!?", "min_tokens": 0}
    assert cell(sentence) == "chunks · ContextControl · Sentence"
    assert cell(dict(sentence, min_tokens=24)) == "chunks · ContextControl · Sentence(min_tokens=24)"
