"""Bad inputs, table-driven: each is refused at start-up with a message naming the key, file or row,
or (for inputs that used to give silently wrong numbers) recomputed. Tiny random model, tiny files."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from conftest import TEXTS, tiny_llama, tiny_run_files
from rcd.errors import RcdError
from rcd.run import config_hash, execute, finite_json, run_folder

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def cfg_for(overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture
def setup(tmp_path):
    files = tiny_run_files(tmp_path)
    folder, corpus, held = files["model"], files["corpus"], files["held"]
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "1", "question": "Who is Hamlet?", "answers": ["a prince"]},
        {"id": "2", "question": "Who is Ophelia?", "answers": ["a lady"]},
    ]))
    common = [f"model.name={folder}", f"datastore_root={tmp_path / 'ds'}", f"runs_root={tmp_path / 'runs'}",
              "progress=false"]
    lm = files["lm"] + [f"runs_root={tmp_path / 'runs'}"]
    qa_args = common + ["task=qa", "corpus=files", f"corpus.datastore.data_files={corpus}",
                        f"corpus.heldout.data_files={held}", f"task.path={qa}", "task.gold_field=null",
                        "task.filter=null", "task.n=null", "task.max_new_tokens=3", "task.answer_regex=null"]
    return {"tmp": tmp_path, "model": folder, "corpus": corpus, "held": held, "qa": qa, "lm": lm, "qa_args": qa_args}


def _write(path: Path, data) -> None:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())


# (case, strategy, extra overrides, files to overwrite {name: content}, expected message regex)
REFUSED = [
    ("eval_tokens=0 used to score everything", "none", ["task.eval_tokens=0"], {}, r"task\.eval_tokens: must be an integer >= 2"),
    ("negative eval_tokens used to slice off the end", "none", ["task.eval_tokens=-5"], {}, r"task\.eval_tokens"),
    ("lambda=1 gave perplexity inf", "per_token", ["strategy.control.lmbda=1.0"], {}, r"lmbda=1\.0 must be in \[0, 1\)"),
    ("k=0 was checked only after the build", "per_token", ["strategy.control.k=0"], {}, r"strategy\.control: knn k=0"),
    ("T=0", "per_token", ["strategy.control.temperature=0"], {}, r"temperature=0"),
    ("nprobe=0 gave a raw FAISS assert", "per_token", ["datastore.nprobe=0", "datastore.index_factory='IVF4,Flat'"], {},
     r"datastore\.nprobe: must be an integer >= 1"),
    ("max_tokens=0 was blamed on the corpus", "per_token", ["datastore.max_tokens=0"], {}, r"datastore\.max_tokens"),
    ("datastore stride > window", "per_token", ["datastore.stride=64", "datastore.window=32"], {}, r"datastore\.stride"),
    ("a typo in a datastore key was ignored", "per_token", ["+datastore.nprob=3"], {}, r"datastore\.nprob: is not a parameter"),
    ("a typo in a control key", "per_token", ["+strategy.control.lambda=0.3"], {}, r"strategy\.control: .*lambda"),
    ("window 1", "none", ["task.window=1"], {}, r"task\.window: must be an integer >= 2"),
    ("stride > window", "none", ["task.stride=64"], {}, r"task\.stride: must be <= task\.window"),
    ("every_n n=0", "every_n", ["strategy.schedule.n=0", "datastore.retriever=bm25", "datastore.chunking=sentence"], {},
     r"strategy\.schedule: EveryN: n"),
    ("unknown retriever", "once", ["datastore.retriever=bm26"], {}, r"datastore\.retriever: must be one of"),
    ("long-prompt policy", "none", ["task.long_prompt=cut"], {}, r"task\.long_prompt: must be one of"),
    ("leak limit out of range", "none", ["leak_check.max_overlap=2"], {}, r"leak_check\.max_overlap"),
    ("empty corpus jsonl had no reason", "per_token", [], {"corpus": ""}, r"corpus file .*corpus\.jsonl is empty"),
    ("invalid JSON line had no line number", "per_token", [], {"corpus": '{"text": "a b c"}\n{"text": oops}\n'},
     r"corpus\.jsonl: line 2 is not valid JSON"),
    ("non-UTF-8 bytes had no file name", "per_token", [], {"corpus": b'{"text": "caf\xe9"}\n'},
     r"corpus\.jsonl: line 1 \(byte 13\) is not UTF-8"),
    ("a corpus row without the text field", "per_token", [], {"corpus": '{"text": "a"}\n{"body": "b"}\n'},
     r"corpus\.jsonl: line 2 has no field 'text'"),
    ("held-out file missing", "none", [], {"held": None}, r"corpus\.heldout\.data_files: corpus file .*held\.jsonl.* does not exist"),
    ("held-out reflowed from the datastore scored -89%", "per_token", [],
     {"held": json.dumps({"text": " ".join(TEXTS[0].split()[:14]) + "\n" + " ".join(TEXTS[0].split()[14:])}) + "\n"},
     r"overlaps the datastore corpus: 100\.0% of its 13-grams"),
]


@pytest.mark.parametrize("case,strategy,extra,files,pattern", REFUSED, ids=[r[0] for r in REFUSED])
def test_lm_bad_input_is_refused_before_any_model_loads(setup, monkeypatch, case, strategy, extra, files, pattern):
    for name, content in files.items():
        if content is None:
            setup[name].unlink()
        else:
            _write(setup[name], content)
    import rcd.models

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(rcd.models, "load_model", no_model)  # the leak check needs no model either
    with pytest.raises(RcdError, match=pattern):
        execute(cfg_for([f"+strategy={strategy}"] + setup["lm"] + extra))
    assert not (setup["tmp"] / "ds").exists() or not any((setup["tmp"] / "ds").iterdir())


QA_REFUSED = [
    ("a later row without answers raised KeyError", '{"question": "q1", "answers": ["a"]}\n{"question": "q2"}\n',
     r"qa\.jsonl: line 2 has no field 'answers'"),
    ("an empty question was scored", '{"question": "q1", "answers": ["a"]}\n{"question": "  ", "answers": ["b"]}\n',
     r"qa\.jsonl: line 2 has an empty or non-string 'question'"),
    ("a null question was scored as 'None'", '{"question": null, "answers": ["a"]}\n',
     r"qa\.jsonl: line 1 has an empty or non-string 'question'"),
    ("empty answers", '{"question": "q", "answers": []}\n', r"line 1 has no usable 'answers'"),
    ("invalid QA JSON", '{"question": "q", "answers": ["a"]}\n\n{"question": \n', r"qa\.jsonl: line 3 is not valid JSON"),
    ("empty QA file", "\n", r"QA file .*qa\.jsonl is empty"),
]


@pytest.mark.parametrize("case,content,pattern", QA_REFUSED, ids=[r[0] for r in QA_REFUSED])
def test_qa_bad_rows_are_refused_with_the_line(setup, monkeypatch, case, content, pattern):
    import rcd.models

    monkeypatch.setattr(rcd.models, "load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    _write(setup["qa"], content)
    with pytest.raises(RcdError, match=pattern):
        execute(cfg_for(["+strategy=none"] + setup["qa_args"]))


def test_model_context_limits_are_checked_before_the_datastore(setup):
    # tiny_llama has 512 positions
    with pytest.raises(RcdError, match=r"task\.window: 1024 is longer than the context .* \(512 positions\)"):
        execute(cfg_for(["+strategy=per_token"] + setup["lm"] + ["task.window=1024", "task.stride=512"]))
    with pytest.raises(RcdError, match=r"task\.max_new_tokens: 600 new tokens leave no room"):
        execute(cfg_for(["+strategy=none"] + setup["qa_args"] + ["task.max_new_tokens=600"]))
    assert not (setup["tmp"] / "ds").exists()


def test_unwritable_runs_and_datastore_folders_are_refused_with_the_fix(setup):
    blocker = setup["tmp"] / "a-file"
    blocker.write_text("x")
    with pytest.raises(RcdError, match=r"runs folder .*a-file.* is not writable .*set runs_root="):
        execute(cfg_for(["+strategy=none"] + setup["lm"] + [f"runs_root={blocker}/runs"]))
    with pytest.raises(RcdError, match=r"cannot use datastore folder .*a-file.* set datastore_root="):
        execute(cfg_for(["+strategy=per_token"] + setup["lm"] + [f"datastore_root={blocker}/ds"]))


def test_long_prompt_policy_drops_truncates_or_refuses(setup):
    long_q = "word " * 150  # 750 characters = 750 tokens with the character tokenizer (context 512)
    _write(setup["qa"], json.dumps({"id": "1", "question": long_q, "answers": ["x"]}) + "\n")
    res = execute(cfg_for(["+strategy=none"] + setup["qa_args"]))
    cost = res["metrics"]["qa"]["cost"]
    assert cost["prompts_truncated"] == 1 and cost["prompts_fitted"] == 1
    with pytest.raises(RcdError, match="exceed the model's context"):
        execute(cfg_for(["+strategy=none", "task.long_prompt=refuse"] + setup["qa_args"]))


def test_non_finite_numbers_never_reach_results_json():
    bad: list = []
    out = finite_json({"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf"), "e": 2}}, bad=bad)
    assert out == {"a": None, "b": [1.0, None], "c": {"d": None, "e": 2}}
    assert bad == ["a=inf", "b[1]=nan", "c.d=-inf"]
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------- silent wrong numbers: now recomputed
def test_new_weights_at_the_same_path_rerun_and_rebuild(setup):
    args = ["+strategy=per_token", "strategy.control.k=8"] + setup["lm"]
    first = execute(cfg_for(args))
    model, tok = tiny_llama(seed=7)  # other weights, same architecture, saved over the old ones
    shutil.rmtree(setup["model"])
    model.save_pretrained(setup["model"])
    tok.save_pretrained(setup["model"])
    second = execute(cfg_for(args))
    assert second["run"]["folder"] != first["run"]["folder"]
    assert second["datastore"]["folder"] != first["datastore"]["folder"]  # keys of the new weights
    assert second["run"]["model_fingerprint"] != first["run"]["model_fingerprint"]
    assert second["metrics"]["perplexity"]["perplexity"] != first["metrics"]["perplexity"]["perplexity"]


def test_data_files_edited_in_place_rerun(setup):
    args = ["+strategy=per_token", "strategy.control.k=8"] + setup["lm"]
    first = execute(cfg_for(args))
    _write(setup["held"], json.dumps({"text": TEXTS[2].upper()}) + "\n")
    second = execute(cfg_for(args))
    assert second["run"]["folder"] != first["run"]["folder"]
    assert second["metrics"]["perplexity"]["perplexity_none"] != first["metrics"]["perplexity"]["perplexity_none"]
    _write(setup["corpus"], "".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:1]))
    third = execute(cfg_for(args))
    assert third["datastore"]["size"] == len(TEXTS[0]) - 1 and third["run"]["folder"] != second["run"]["folder"]
    qa_cfg = cfg_for(["+strategy=none"] + setup["qa_args"])
    before = run_folder(qa_cfg)
    setup["qa"].write_text(setup["qa"].read_text().replace("a prince", "the prince"))
    assert run_folder(qa_cfg) != before
    assert third["inputs"]["corpus.datastore.data_files"]["fingerprint"]  # recorded with the results


def test_same_content_elsewhere_is_reused(setup, monkeypatch, tmp_path):
    args = ["+strategy=per_token", "strategy.control.k=8"] + setup["lm"]
    first = execute(cfg_for(args))
    copy = tmp_path / "elsewhere" / "model"
    shutil.copytree(setup["model"], copy)
    monkeypatch.setenv("RCD_CACHE", str(tmp_path / "another-cache"))
    moved = [a.replace(str(setup["model"]), str(copy)) for a in args]
    assert config_hash(cfg_for(moved)) == config_hash(cfg_for(args))
    second = execute(cfg_for(moved + ["force=true"]))
    assert second["datastore"]["folder"] == first["datastore"]["folder"]  # not rebuilt
    assert second["metrics"]["perplexity"]["perplexity"] == first["metrics"]["perplexity"]["perplexity"]


def test_results_record_code_version_and_leak_check(setup):
    res = execute(cfg_for(["+strategy=per_token", "strategy.control.k=8"] + setup["lm"]))
    assert set(res["run"]["code"]) == {"rcd", "source", "commit", "dirty"}
    assert res["leak_check"]["ngram"] == 13 and res["leak_check"]["overlap"] == 0.0
    json.loads(Path(res["run"]["folder"], "results.json").read_text())


def test_zeroed_array_of_the_right_size_is_refused(setup):
    res = execute(cfg_for(["+strategy=per_token", "strategy.control.k=8"] + setup["lm"]))
    values = Path(res["datastore"]["folder"]) / "values.npy"
    arr = np.load(values)
    np.save(values, np.zeros_like(arr))
    with pytest.raises(RcdError, match=r"values\.npy does not match its checksum"):
        execute(cfg_for(["+strategy=per_token", "strategy.control.k=8", "force=true"] + setup["lm"]))


# ---------------------------------------------------------------- one error form, one exit code
@pytest.mark.parametrize("module,args,pattern", [
    ("rcd.run", ["+strategy=per_token", "strategy.control.k=0"], "strategy.control: knn k=0"),
    ("rcd.run", ["+strategy=per_token", "datastore.nprobe=0"], "datastore.nprobe"),
    ("rcd.build", ["datastore=tokens", "datastore.max_tokens=0"], "datastore.max_tokens"),
])
def test_cli_refusals_exit_2_with_one_form(module, args, pattern):
    p = subprocess.run([sys.executable, "-m", module] + args, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"[rcd] error: {pattern}" in p.stderr
