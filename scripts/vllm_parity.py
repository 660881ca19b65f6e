"""engine=hf against engine=vllm on the same prompts: identical greedy tokens? max |Δ log p| per step?

    python scripts/vllm_parity.py [--presets none once every_n per_sentence adaptive per_token] [--prompts 8]
        [--new-tokens 32] [--out paper/bench/vllm_parity.json] [overrides ...]

Each preset is composed from rcd's configs (model, corpus and datastore defaults, plus the overrides given),
its strategy built once per engine, and the same prompts (lines of the held-out corpus, after its first
``--skip-chars`` characters) decoded greedily on both engines for ``--new-tokens`` tokens (no eos stop). For
every row and step where the tokens so far agree: |log p_hf(token) - log p_vllm(token)| of the chosen token
(HF: the engine's trace; vLLM: its processed log-probabilities, after rcd's kNN mixture). Prints one table
and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


RETRIEVER = [None]  # --retriever: datastore.retriever of text units (chunks, tags, latent)


def compose(preset: str, engine: str, overrides: list[str]):
    from rcd.paper.experiments import compose as rcd_compose

    over = [f"+strategy={preset}", f"engine={engine}", "task.name=generate", *overrides]  # built to generate
    cfg = rcd_compose(over)
    if RETRIEVER[0] and cfg.get("datastore") and cfg.datastore.get("unit") in ("chunks", "tags", "latent"):
        cfg = rcd_compose(over + [f"datastore.retriever={RETRIEVER[0]}"])
    return cfg


def prompts_of(cfg, n: int, skip_chars: int) -> list[str]:
    from hydra.utils import instantiate

    ds = instantiate(cfg.corpus.heldout)
    text = "\n".join(ds["text"])[skip_chars:]
    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 30]
    return lines[:n]


def run(preset: str, overrides: list[str], lm, corpus_ds, prompts: list[str], new_tokens: int) -> dict:
    from omegaconf import OmegaConf

    from rcd import strategy as strategy_mod
    from rcd.engine import from_config
    from rcd.paths import cache_dir

    out: dict = {"preset": preset}
    toks, traces, costs = {}, {}, {}
    for engine in ("hf", "vllm"):
        cfg = compose(preset, engine, overrides)
        strat = strategy_mod.build(cfg, lm, corpus_ds, corpus_name=cfg.corpus.name, datastore_root=cache_dir("datastores"))
        trace: list = []
        eng = from_config(lm, strat if not strat.is_baseline else None, cfg, task="generate", provenance=[],
                          max_new_tokens=new_tokens, stop_at_eos=False, trace=trace, batch_size=len(prompts))
        t0 = time.perf_counter()
        o = eng.generate(prompts)
        costs[engine] = {"seconds": time.perf_counter() - t0, "retrievals": o.cost["retrievals"],
                         "tokens": o.cost["tokens"], **{k: o.cost[k] for k in ("vllm_calls", "segments", "prompt_tokens",
                                                                             "cached_tokens", "prefilled_tokens")
                                                       if k in o.cost}}
        toks[engine], traces[engine] = o.token_ids, trace
        sched = cfg.strategy.get("schedule")
        out["schedule"] = OmegaConf.to_container(sched, resolve=True) if sched is not None else None
    hf_lp = {}  # (row, step) -> log p_hf of the token HF chose
    for rec in traces["hf"]:
        for b, g in enumerate(rec["gen"]):
            s = rec["step"]
            if s < len(toks["hf"][b]):
                hf_lp[(b, s)] = float(rec["logprobs"][b, toks["hf"][b][s]])
    deltas = []
    for rec in traces["vllm"]:
        b, s = rec["row"], rec["step"]
        if toks["hf"][b][:s + 1] == toks["vllm"][b][:s + 1] and (b, s) in hf_lp:
            deltas.append(abs(hf_lp[(b, s)] - rec["logprob"]))
    same = sum(a == v for a, v in zip(toks["hf"], toks["vllm"]))
    out.update({"rows": len(prompts), "identical_rows": same, "identical": same == len(prompts),
                "first_difference": next(([b, next(i for i, (x, y) in enumerate(zip(a, v)) if x != y)]
                                          for b, (a, v) in enumerate(zip(toks["hf"], toks["vllm"])) if a != v), None),
                "max_abs_dlogp": max(deltas) if deltas else None, "steps_compared": len(deltas), "cost": costs})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+",
                    default=["none", "once", "every_n", "per_sentence", "adaptive", "per_token", "tags"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-chars", type=int, default=20000, help="prompts come from the held-out text after this")
    ap.add_argument("--retriever", choices=["dense", "bm25", "hybrid"], default=None,
                    help="datastore.retriever of the text units (default: the configs')")
    ap.add_argument("--out", type=Path, default=Path("paper/bench/vllm_parity.json"))
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every preset (e.g. datastore.retriever=bm25)")
    a = ap.parse_args(argv)
    RETRIEVER[0] = a.retriever
    from hydra.utils import instantiate

    from rcd.models import load_model

    base = compose("none", "hf", a.overrides)
    lm = load_model(base.model.name, base.model.device, base.model.dtype)
    corpus_ds = instantiate(base.corpus.datastore)
    prompts = prompts_of(base, a.prompts, a.skip_chars)
    rows = [run(p, a.overrides, lm, corpus_ds, prompts, a.new_tokens) for p in a.presets]
    print(f"{'preset':<14}{'identical rows':>16}{'max |dlogp|':>14}{'steps':>8}{'hf s':>8}{'vllm s':>8}{'retrievals':>12}")
    for r in rows:
        d = r["max_abs_dlogp"]
        print(f"{r['preset']:<14}{r['identical_rows']:>9} of {r['rows']:<4}{(f'{d:.2e}' if d is not None else '-'):>14}"
              f"{r['steps_compared']:>8}{r['cost']['hf']['seconds']:>8.1f}{r['cost']['vllm']['seconds']:>8.1f}"
              f"{r['cost']['hf']['retrievals']:>6}/{r['cost']['vllm']['retrievals']:<5}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": lm.name, "prompts": prompts, "new_tokens": a.new_tokens,
                                 "overrides": a.overrides, "presets": rows}, indent=2))
    print(f"[rcd] wrote {a.out}")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
