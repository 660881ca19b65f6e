"""The language-modelling task: held-out perplexity and free continuation, plain vs strategy.

Both numbers of each pair come from the same process: perplexity from one forward pass per
window (see :mod:`rcd.tasks.perplexity`), generation from two ``model.generate`` calls.
"""
from __future__ import annotations

from typing import Optional

import torch

from rcd import calibrate
from rcd.tasks import generate as gen
from rcd.tasks import perplexity


def validate(cfg) -> None:
    """Start-up checks of the LM task (rcd.validate)."""
    from rcd.validate import ConfigError, check_long_prompt, positive_int

    t = cfg.task
    positive_int("task.eval_tokens", t.get("eval_tokens"), allow_none=True, minimum=2)
    positive_int("task.window", t.get("window"), minimum=2)
    positive_int("task.stride", t.get("stride"))
    if t.get("prefix_token") not in (None, "bos", "eos"):
        raise ConfigError("task.prefix_token", f"must be null, bos or eos, got {t.get('prefix_token')!r}")
    if t.stride > t.window:
        raise ConfigError("task.stride", f"must be <= task.window={t.window}, got {t.stride}")
    check_long_prompt(cfg)
    if t.get("generate", True):
        positive_int("task.max_new_tokens", t.get("max_new_tokens"))
        prompts = list(t.get("prompts") or [])
        if not prompts:
            positive_int("task.num_prompts", t.get("num_prompts", 2))
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ConfigError(f"task.prompts[{i}]", f"must be a non-empty string, got {p!r}")


def validate_with_model(cfg, lm) -> None:
    """The scoring window and the generation budget fit the model's context."""
    from rcd.validate import ConfigError, check_generation_fits

    ctx = lm.context_length
    if ctx is not None and int(cfg.task.window) > ctx:
        raise ConfigError("task.window", f"{cfg.task.window} is longer than the context of {lm.name!r} ({ctx} "
                          f"positions); choose task.window <= {ctx}")
    if cfg.task.get("generate", True):
        check_generation_fits(cfg, lm)


def prefix_id(lm, prefix_token: Optional[str]) -> Optional[int]:
    """The id ``task.prefix_token`` names (``bos``/``eos``: the tokenizer's; BOS falls back to EOS), or None."""
    if prefix_token is None:
        return None
    tok = lm.tokenizer
    pid = tok.bos_token_id if prefix_token == "bos" and tok.bos_token_id is not None else tok.eos_token_id
    if pid is None:
        raise ValueError(f"task.prefix_token={prefix_token}: the tokenizer of {lm.name} has no BOS or EOS token")
    return int(pid)


def token_budget(lengths: list[int], eval_tokens: Optional[int]) -> list[int]:
    """Tokens scored from each held-out document: ``eval_tokens`` spread evenly over the documents (the
    first documents get the remainder); a document shorter than its share gives what it lacks to the
    others, pass by pass, until the budget or the documents run out. null: every token of every document."""
    if eval_tokens is None:
        return list(lengths)
    alloc, left = [0] * len(lengths), int(eval_tokens)
    open_ = [i for i, n in enumerate(lengths) if n > 0]
    while open_ and left > 0:
        share, extra = divmod(left, len(open_))
        for j, i in enumerate(list(open_)):
            want = share + (1 if j < extra else 0)
            take = min(want, lengths[i] - alloc[i])
            alloc[i] += take
            left -= take
        open_ = [i for i in open_ if alloc[i] < lengths[i]]
        if share == 0 and extra == 0:
            break
    return alloc


def heldout_docs(lm, heldout_ds, eval_tokens, prefix_token: Optional[str] = None) -> list[dict]:
    """The held-out documents to score, each ``{id, ids, offset_chars}``: its first tokens by
    :func:`token_budget`, each document scored on its own (the first token is context only, unless
    ``prefix_token`` puts the BOS/EOS id before it, as lm-eval-harness's rolling log-likelihood does);
    ``offset_chars``: where the scored text ends in ``text``. Documents left with < 2 ids are skipped."""
    texts = list(heldout_ds["text"])
    ids_ids = list(heldout_ds["id"]) if "id" in heldout_ds.column_names else [str(i) for i in range(len(texts))]
    enc = [lm.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    alloc = token_budget([len(e) for e in enc], None if eval_tokens is None else int(eval_tokens))
    pid = prefix_id(lm, prefix_token)
    out = []
    for doc_id, text, e, n in zip(ids_ids, texts, enc, alloc):
        ids = ([pid] if pid is not None else []) + e[:n]
        if len(ids) < 2:
            continue
        out.append({"id": str(doc_id), "text": text, "ids": torch.tensor(ids),
                    "offset_chars": len(lm.tokenizer.decode(e[:n]))})
    if not out:
        raise ValueError("the held-out text is empty: choose another held-out set (corpus.heldout)")
    return out


def prompts_from(docs: list[dict], num: int, min_chars: int = 20) -> list[str]:
    """``num`` generation prompts from the evaluated documents (:func:`heldout_docs`), round-robin over them:
    the next line of at least ``min_chars`` characters after each document's scored text (its first such
    line if none follows)."""
    pools = []
    for d in docs:
        text = d["text"]
        after = [ln.strip() for ln in text[d["offset_chars"]:].splitlines()[1:] if len(ln.strip()) >= min_chars]
        pools.append(after or [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= min_chars])
    out, k = [], 0
    while len(out) < num and any(len(p) > k for p in pools):
        out += [p[k] + "\n" for p in pools if len(p) > k][: num - len(out)]
        k += 1
    return out


def score_docs(lm, docs: list[dict], strategy, window: int, stride: int):
    """Each document scored under the strategy's engine (the plain model for ``none``), pooled
    (one PerplexityResult, every scored token)."""
    engine = getattr(strategy, "engine", None)
    return perplexity.PerplexityResult.pool([perplexity.score(lm, d["ids"], window=window, stride=stride, engine=engine)
                                             for d in docs])


def run(cfg, lm, strategy, heldout_ds, provenance) -> dict:
    t = cfg.task
    docs = heldout_docs(lm, heldout_ds, t.eval_tokens, t.get("prefix_token"))
    calibration = calibrate.calibrate_lm(cfg, lm, strategy, docs)  # target_rate: θ from text not evaluated
    ppl = score_docs(lm, docs, strategy, t.window, t.stride)
    metrics = {"perplexity": ppl.summary(),  # and the scoring's seconds, with the strategy and the plain forwards alone
               "scoring_time": {"seconds": ppl.seconds, "seconds_none": ppl.seconds_none}}
    if calibration is not None:
        metrics["calibration"] = dict(calibration, achieved_rate=metrics["perplexity"]["retrieval_rate"])
    # which text was scored: the rule (token_budget) and each document's scored tokens
    metrics["perplexity"]["documents"] = [{"id": d["id"], "tokens": int(d["ids"].numel()) - 1} for d in docs]
    if strategy.schedule is not None and hasattr(strategy.schedule, "log_stats"):
        # logs the rate (the scorer's: one retrieval rate per run); Adaptive warns if degenerate
        metrics["schedule"] = strategy.schedule.log_stats(rate=metrics["perplexity"].get("retrieval_rate"))
    prompts = []
    if t.get("generate", True):  # task.prompts, or lines of the evaluated documents (prompts_from)
        prompts = list(t.prompts) if t.get("prompts") else prompts_from(docs, int(t.get("num_prompts", 2)))
    gens = {}
    policy = t.get("long_prompt", "drop_passages")
    on_engine = getattr(strategy.engine, "kind", "hf") != "hf"  # engine=vllm: generate on that engine
    if prompts and on_engine:
        from rcd.engine import from_config

        common = dict(task="generate", provenance=provenance, max_new_tokens=int(t.max_new_tokens),
                      stop_at_eos=False, long_prompt=policy)  # as model.generate with min_new_tokens
        gens["none"] = gen.generate_on(from_config(lm, None, cfg, **common), prompts, int(t.max_new_tokens))
        if not strategy.is_baseline:
            gens[strategy.name] = gen.generate_on(from_config(lm, strategy, cfg, **common), prompts,
                                                  int(t.max_new_tokens))
    elif prompts:
        gens["none"] = gen.generate(lm, prompts, None, max_new_tokens=t.max_new_tokens, seed=cfg.seed,
                                    long_prompt=policy)
    if prompts and not strategy.is_baseline and not on_engine:
        proc = strategy.processor()
        with_ret = gen.generate(lm, prompts, proc, max_new_tokens=t.max_new_tokens, seed=cfg.seed,
                                long_prompt=policy)
        gens[strategy.name] = with_ret
        nb = getattr(strategy.control, "last_neighbours", None)
        if nb is not None:
            provenance.append({"task": "generate", "note": "neighbours at the last generation step",
                               "ids": nb.ids[:, :8].tolist(), "scores": nb.scores[:, :8].tolist(),
                               "tokens": nb.tokens[:, :8].tolist()})
    metrics["generation"] = {k: {kk: v[kk] for kk in ("tokens_per_second", "time_to_first_token", "new_tokens",
                                                      "prompts_truncated")}
                             for k, v in gens.items()}
    if len(gens) == 2:
        a, b = gens["none"]["tokens_per_second"], gens[strategy.name]["tokens_per_second"]
        metrics["generation"]["throughput_ratio"] = b / a if a else None
    per_example = {"nll_none": [round(float(x), 5) for x in ppl.nll_none]}
    if ppl.nll is not None:
        per_example["nll"] = [round(float(x), 5) for x in ppl.nll]
    return {"metrics": metrics, "samples": {k: v["texts"] for k, v in gens.items()}, "prompts": prompts,
            "per_example": per_example}


def summary_rows(strategy_name: str, res: dict, datastore_size) -> list[list[str]]:
    p, g = res["metrics"]["perplexity"], res["metrics"]["generation"]
    tps = lambda name: f"{g[name]['tokens_per_second']:.1f}" if name in g else "-"  # noqa: E731
    ttft = lambda name: f"{g[name]['time_to_first_token']:.3f}" if name in g else "-"  # noqa: E731
    rows = [["strategy", "perplexity", "bits/byte", "retrieval rate (share of steps)", "decode tok/s",
             "time to 1st tok (s)", "datastore"],
            ["none", f"{p['perplexity_none']:.2f}", f"{p['bits_per_byte_none']:.4f}", "0.000", tps("none"), ttft("none"), "-"]]
    if strategy_name != "none" and "perplexity" in p:
        ratio = f" ({g['throughput_ratio']:.2f}x)" if g.get("throughput_ratio") else ""
        rows.append([strategy_name, f"{p['perplexity']:.2f} ({p['relative_change']:+.1%})", f"{p['bits_per_byte']:.4f}",
                     f"{p['retrieval_rate']:.3f}", tps(strategy_name) + ratio, ttft(strategy_name),
                     f"{datastore_size:,}" if datastore_size else "-"])
    return rows
