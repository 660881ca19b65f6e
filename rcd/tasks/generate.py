"""Free continuation of prompts with ``model.generate``, with the strategy as a logits processor.

The processor (:meth:`rcd.strategy.Strategy.processor`) attaches its own hooks for the call
(``processor.attach(model)`` / ``detach()``: e.g. kNN-LM's query capture at the datastore's key
layer) and leaves the model as it was.

Reports decode throughput (new tokens / second) and time to first token, for the plain model and
the strategy, measured in the same process.
"""
from __future__ import annotations

import time
from typing import Optional

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rcd.errors import RcdError


class _FirstTokenTimer(LogitsProcessor):
    def __init__(self):
        self.t_first: Optional[float] = None

    def __call__(self, input_ids, scores):
        if self.t_first is None:
            self.t_first = time.perf_counter()
        return scores


@torch.inference_mode()
def generate(lm, prompts: list[str], processor=None, *, max_new_tokens: int = 64, do_sample: bool = False,
             seed: int = 0, long_prompt: str = "truncate_left") -> dict:
    """Greedy (or seeded sampling) continuations; ``processor`` is a LogitsProcessor or None.

    A prompt whose tokens and ``max_new_tokens`` exceed the model's context keeps its last tokens
    (``long_prompt`` drop_passages / truncate_left; counted as ``prompts_truncated``) or is refused
    (``refuse``)."""
    tok, model = lm.tokenizer, lm.model
    tok.padding_side = "left"
    ctx = lm.context_length
    limit = None if ctx is None else ctx - max_new_tokens
    lengths = [len(x) for x in tok(prompts)["input_ids"]]
    too_long = [i for i, n in enumerate(lengths) if limit is not None and n > limit]
    if too_long and long_prompt == "refuse":
        raise RcdError(f"task.prompts[{too_long[0]}] has {lengths[too_long[0]]} tokens; with {max_new_tokens} new "
                       f"tokens it exceeds the context of {lm.name!r} ({ctx}); shorten it or set "
                       "task.long_prompt=truncate_left")
    tok.truncation_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, truncation=bool(too_long),
              max_length=limit if too_long else None).to(lm.device)
    timer = _FirstTokenTimer()
    procs = LogitsProcessorList([timer] + ([processor] if processor is not None else []))
    hooked = processor is not None and hasattr(processor, "attach")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    if hooked:
        processor.attach(model)
    try:
        out = model.generate(**enc, logits_processor=procs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                             min_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
    finally:
        if hooked:
            processor.detach()
    total = time.perf_counter() - t0
    new = out[:, enc["input_ids"].shape[1]:]
    ttft = (timer.t_first - t0) if timer.t_first else total
    n_new = int(new.numel())
    decode_time = max(1e-9, total - ttft)
    return {
        "texts": tok.batch_decode(new, skip_special_tokens=True),
        "new_tokens": n_new,
        "seconds": total,
        "time_to_first_token": ttft,
        "tokens_per_second": (n_new - len(prompts)) / decode_time if n_new > len(prompts) else 0.0,
        "prompts_truncated": len(too_long),
    }


def generate_on(engine, prompts: list[str], max_new_tokens: int) -> dict:
    """:func:`generate`'s record from an engine's own decoding loop (``engine=vllm``, where a strategy does not
    run inside ``model.generate``): texts, new tokens, seconds, time to first token, decode tok/s."""
    out = engine.generate(prompts, max_new_tokens)
    c = out.cost
    n_new, total = int(c["tokens"]), float(c["wall_s"])
    ttft = float(c["ttft"] if c["ttft"] is not None else total)
    decode_time = max(1e-9, total - ttft)
    return {"texts": out.texts, "new_tokens": n_new, "seconds": total, "time_to_first_token": ttft,
            "tokens_per_second": (n_new - len(prompts)) / decode_time if n_new > len(prompts) else 0.0,
            "prompts_truncated": int(c.get("prompts_truncated", 0)), "cost": c}
