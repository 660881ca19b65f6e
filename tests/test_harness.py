"""The lm-eval-harness backend (``--model rcd``): a task YAML over a local jsonl, run by lm-eval offline, gives
rcd's own numbers: the rolling log-likelihood's bits per byte equals ``rcd.run task=lm task.prefix_token=bos``
on the same text, for ``none`` and ``per_token``; loglikelihood and generate_until against fresh forwards."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import TEXTS, tiny_run_files

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install rcd[harness]")

TASK = """task: rcd_tiny_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {held}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""


def _args(files, tmp_path, **extra) -> dict:
    return {"model.name": str(files["model"]), "corpus": "files", "corpus.datastore.data_files": str(files["corpus"]),
            "corpus.heldout.data_files": str(files["held"]), "task.window": 32, "task.stride": 16,
            "task.eval_tokens": None, "datastore_root": str(tmp_path / "ds"), "progress": False,
            "runs_root": str(tmp_path / "runs"), **extra}


@pytest.mark.parametrize("strategy", [{"strategy": "none"},
                                      {"strategy": "per_token", "strategy.control.k": 8, "datastore.max_tokens": None}])
def test_lm_eval_rolling_perplexity_equals_rcd_perplexity(tmp_path, strategy):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import rcd.harness  # noqa: F401  (registers --model rcd)
    from rcd.paper.experiments import compose
    from rcd.run import execute

    files = tiny_run_files(tmp_path)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "rcd_tiny_ppl.yaml").write_text(TASK.format(held=files["held"]))
    args = _args(files, tmp_path, **strategy)
    out = simple_evaluate(model="rcd", model_args=args, tasks=["rcd_tiny_ppl"],
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=False)
    got = out["results"]["rcd_tiny_ppl"]["bits_per_byte,none"]

    ov = [("+" if k == "strategy" else "") + f"{k}={'null' if v is None else v}" for k, v in args.items()]
    res = execute(compose(ov + ["task.prefix_token=bos", "task.generate=false"]))
    p = res["metrics"]["perplexity"]
    want = p["bits_per_byte"] if strategy["strategy"] != "none" else p["bits_per_byte_none"]
    assert p["bytes"] == len(TEXTS[2].encode()) and p["tokens"] == len(TEXTS[2])  # every char token scored
    assert got == pytest.approx(want, rel=1e-9)
    if strategy["strategy"] != "none":
        assert abs(p["bits_per_byte"] - p["bits_per_byte_none"]) > 1e-6  # the datastore changed the number


def test_loglikelihood_and_generate_until_against_fresh_forwards(tmp_path):
    from lm_eval.api.instance import Instance

    from rcd.harness import RcdLM

    files = tiny_run_files(tmp_path)
    lm = RcdLM(**_args(files, tmp_path, strategy="none"))
    tok, model = lm.lm.tokenizer, lm.lm.model
    ctx, cont = "To be, or ", "not to"
    ids = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    n = len(tok(cont, add_special_tokens=False)["input_ids"])
    want = sum(lp[i - 1, ids[i]].item() for i in range(len(ids) - n, len(ids)))
    greedy = all(lp[i - 1].argmax().item() == ids[i] for i in range(len(ids) - n, len(ids)))
    req = Instance("loglikelihood", {}, (ctx, cont), 0)
    ((ll, is_greedy),) = lm.loglikelihood([req])
    assert ll == pytest.approx(want, rel=1e-5) and is_greedy == greedy
    # a continuation that is the model's own greedy output is greedy
    g = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [], "max_gen_toks": 3}), 0)])[0]
    assert len(g) == 3 and lm.loglikelihood([Instance("loglikelihood", {}, (ctx, g), 0)])[0][1] is True
    # generation stops at the first stop string
    long = lm.generate_until([Instance("generate_until", {}, (ctx, {"max_gen_toks": 8}), 0)])[0]
    stop = long[2]
    cut = lm.generate_until([Instance("generate_until", {}, (ctx, {"until": [stop], "max_gen_toks": 8}), 0)])[0]
    assert cut == long[:long.find(stop)]
    ((roll,),) = [lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc",), 0)])]
    eos = tok.eos_token_id
    x = [eos] + tok("abc", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([x])).logits[0].float(), -1)
    assert roll == pytest.approx(sum(lp[i - 1, x[i]].item() for i in range(1, len(x))), rel=1e-5)
    assert math.isfinite(roll)
