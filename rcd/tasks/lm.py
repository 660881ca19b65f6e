"""The language-modelling task: held-out perplexity and free continuation, plain vs strategy.

Both numbers of each pair come from the same process: perplexity from one forward pass per
window (see :mod:`rcd.tasks.perplexity`), generation from two ``model.generate`` calls.
"""
from __future__ import annotations

from typing import Optional

import torch

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
            raise ConfigError("task.prompts", "is empty but task.generate=true; give prompts or task.generate=false")
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


def heldout_ids(lm, heldout_ds, eval_tokens, prefix_token: Optional[str] = None) -> torch.Tensor:
    """Token ids of the held-out text (its documents joined by a blank line), at most ``eval_tokens``;
    with ``prefix_token`` the BOS/EOS id first, so that the text's first token is scored too (as
    lm-eval-harness's rolling log-likelihood does)."""
    text = "\n\n".join(heldout_ds["text"])
    ids = lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if eval_tokens is not None:  # validated at start-up: null (all) or >= 2
        ids = ids[: int(eval_tokens)]
    pid = prefix_id(lm, prefix_token)
    if pid is not None:
        ids = torch.cat([torch.tensor([pid], dtype=ids.dtype), ids])
    if ids.numel() < 2:
        raise ValueError("the held-out text is empty: choose another held-out set (corpus.heldout)")
    return ids


def run(cfg, lm, strategy, heldout_ds, provenance) -> dict:
    t = cfg.task
    ids = heldout_ids(lm, heldout_ds, t.eval_tokens, t.get("prefix_token"))
    ppl = perplexity.score(lm, ids, strategy.control, strategy.schedule, window=t.window, stride=t.stride)
    metrics = {"perplexity": ppl.summary()}
    if strategy.schedule is not None and hasattr(strategy.schedule, "stats"):
        metrics["schedule"] = strategy.schedule.stats()
    prompts = list(t.prompts) if t.get("generate", True) else []
    gens = {}
    policy = t.get("long_prompt", "drop_passages")
    if prompts:
        gens["none"] = gen.generate(lm, prompts, None, max_new_tokens=t.max_new_tokens, seed=cfg.seed,
                                    long_prompt=policy)
    if prompts and not strategy.is_baseline:
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
