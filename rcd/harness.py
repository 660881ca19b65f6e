"""lm-evaluation-harness backend: any lm-eval task under any rcd strategy.

    rcd-lm-eval --model rcd --model_args strategy=per_token,strategy.control.k=64 --tasks wikitext
    python -m rcd.harness --model rcd --model_args strategy=none --tasks <task> --include_path my_tasks/

``rcd-lm-eval`` is lm-eval's own command line with rcd registered as model ``rcd`` (lm-eval has no
plug-in discovery for models, so plain ``lm_eval`` does not know it; in Python, ``import rcd.harness``
registers it for ``lm_eval.simple_evaluate(model="rcd", ...)``). Every ``--model_args`` pair is a Hydra
override of rcd's run config, as on ``rcd-run``'s command line (``strategy=x`` is ``+strategy=x``;
values with commas cannot pass through lm-eval's comma-separated string: use a preset or
``simple_evaluate(model_args={...})``). The config is checked at start-up like a run's, then the
model and the strategy's datastore load (built on first use, cached as for ``rcd-run``).

What each request type computes, with the strategy:

* ``loglikelihood_rolling(text)``: the text's tokens after the tokenizer's BOS (EOS if none) scored by
  rcd's scorer (:func:`rcd.tasks.perplexity.score`, the one every rcd task uses), with rcd's sliding
  ``task.window`` / ``task.stride`` (not lm-eval's disjoint chunks); equal to ``rcd-run task=lm
  task.prefix_token=bos`` on the same text.
* ``loglikelihood(context, continuation)``: the continuation's log-probability from the same scorer
  over context + continuation (empty context: the BOS/EOS token); ``is_greedy`` by greedy decoding
  the continuation's length from the context with the strategy's engine (retrieval included).
* ``generate_until(context, {until, max_gen_toks})``: greedy decoding with the strategy's engine,
  cut at the first stop string.

The plain model is ``strategy=none``.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError("the lm-eval backend needs lm-eval: pip install rcd[harness]") from e

def _override(key: str, value: Any) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif value is None:
        value = "null"
    return ("+" if key == "strategy" else "") + f"{key}={value}"


@register_model("rcd")
class RcdLM(LM):
    """rcd's model + strategy behind lm-eval's ``LM`` interface (see the module doc)."""

    def __init__(self, batch_size: Any = None, max_batch_size: Any = None, device: Optional[str] = None,
                 **overrides: Any) -> None:
        super().__init__()
        from hydra.utils import instantiate

        from rcd import strategy as strategy_mod
        from rcd.models import load_model
        from rcd.paths import datastore_root
        from rcd.paper.experiments import compose
        from rcd.validate import check_config, check_with_model

        ov = [_override(k, v) for k, v in overrides.items()]
        if device and "model.device" not in overrides:  # lm-eval's --device (its default is cuda:0)
            import torch

            if str(device).startswith("cuda") and not torch.cuda.is_available():
                print(f"[rcd] lm-eval asks for device {device}, but CUDA is not available: using the config's "
                      "model.device (auto: cpu); pass --device cpu to silence this", file=sys.stderr)
            else:
                ov.append(f"model.device={device}")
        if not any(o.startswith("+strategy=") for o in ov):
            ov.append("+strategy=none")
        self.cfg = cfg = compose(ov + ["task.generate=false"])
        check_config(cfg)  # every parameter and data row, before any model or datastore loads
        self.lm = lm = load_model(cfg.model.name, cfg.model.device, cfg.model.dtype)
        check_with_model(cfg, lm)
        corpus_ds = instantiate(cfg.corpus.datastore) if cfg.get("datastore") else None
        self.strategy = strategy_mod.build(cfg, lm, corpus_ds, corpus_name=str(cfg.corpus.name),
                                           datastore_root=datastore_root(cfg))
        self.window, self.stride = int(cfg.task.window), int(cfg.task.stride)
        tok = lm.tokenizer
        self.prefix_id = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        if self.prefix_id is None:
            raise ValueError(f"{lm.name}: the tokenizer has neither a BOS nor an EOS token to condition on")
        self._engines: dict[int, Any] = {}  # max_new_tokens -> Engine (its prompt limit depends on it)
        self._device = lm.device

    def _engine(self, max_new: int):
        """The strategy's engine for ``max_new`` new tokens, built once per budget."""
        from rcd.engine import from_config

        if max_new not in self._engines:
            self._engines[max_new] = from_config(self.lm, None if self.strategy.is_baseline else self.strategy,
                                                 self.cfg, task="generate", max_new_tokens=max_new, batch_size=1)
        return self._engines[max_new]

    # ------------------------------------------------------------------ helpers
    def _encode(self, text: str) -> list[int]:
        return self.lm.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _nll(self, ids: list[int]):
        """Per-token NLL of ids[1:] given the ones before it, with the strategy (rcd's scorer)."""
        import torch

        from rcd.tasks.perplexity import score

        res = score(self.lm, torch.tensor(ids), window=self.window, stride=self.stride, engine=self._engine(1))
        return res.nll if res.nll is not None else res.nll_none

    def _greedy(self, context_ids: list[int], context: str, continuation_ids: list[int]) -> bool:
        from rcd.engine import Request

        prompt = context if context_ids and context else self.lm.tokenizer.decode([self.prefix_id])
        out = self._engine(len(continuation_ids)).generate([Request(prompt)])
        return out.token_ids[0][:len(continuation_ids)] == continuation_ids

    # ------------------------------------------------------------------ lm-eval API
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            ids = [self.prefix_id] + self._encode(text)
            ll = -float(self._nll(ids).sum()) if len(ids) > 1 else 0.0
            out.append(ll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), ll)
        return out

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            ctx = self._encode(context) or [self.prefix_id]
            cont = self._encode(continuation)
            if not cont:
                raise ValueError(f"loglikelihood: the continuation {continuation!r} is empty after tokenization")
            nll = self._nll(ctx + cont)
            ll = -float(nll[-len(cont):].sum())
            greedy = self._greedy(self._encode(context), context, cont)
            out.append((ll, greedy))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), (ll, greedy))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from rcd.engine import Request

        out = []
        for req in requests:
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            prompt = context or self.lm.tokenizer.decode([self.prefix_id])
            text = self._engine(max_new).generate([Request(prompt)]).texts[0]
            cut = min([text.find(s) for s in until if s and s in text], default=-1)
            text = text[:cut] if cut >= 0 else text
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return out

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.name)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.lm.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)


def cli() -> None:
    """``rcd-lm-eval``: lm-eval's command line with model ``rcd`` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    sys.exit(cli())
