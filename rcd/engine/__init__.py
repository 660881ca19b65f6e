"""The decoding engine: one loop that owns the KV cache and serves generation, QA and scoring.

A strategy = what (datastore) × how (control) × when (schedule). The engine runs it generically
through the control protocol (:mod:`rcd.control.base`), one job per module:

=========================  ====================================================================
:mod:`rcd.engine.core`     :class:`Engine` (configuration, prompts, queries, search, provenance)
:mod:`rcd.engine.cache`    KV-cache bookkeeping for left-padded batches (prefill, step, splice)
:mod:`rcd.engine.query`    retrieval queries and the evidence rows they return
:mod:`rcd.engine.decoding` the decoding loop of one batch (:class:`Decoding`)
:mod:`rcd.engine.scoring`  the one perplexity path (:class:`Scorer`, :class:`PerplexityResult`)
:mod:`rcd.engine.processor` the ``model.generate`` adapter
=========================  ====================================================================

Schedules that do not read probabilities (once, every_n, sentence, every_token) are asked
*before* the forward pass of their step, so a firing step costs one prefill, not a step plus a
prefill. ``adaptive`` reads p_t, so the step is computed first; when it fires the prompt is rebuilt
(``rebuilds_prompt``) or the last position recomputed with the control's hooks on
(``acts_in_forward``). A row whose prompt changed is re-prefilled from token ids (its new prompt +
the token ids it generated; the generated text is never re-tokenized, so this reproduces a fresh
forward pass).
"""
from rcd.engine.core import LONG_PROMPT, Engine, EngineError, Output, Request, from_config
from rcd.engine.decoding import Decoding
from rcd.engine.processor import EngineProcessor, processor_for
from rcd.control.context import passages_from_hits
from rcd.engine.query import QUERY_MODES
from rcd.engine.scoring import PerplexityResult, Scorer, windows

__all__ = ["Engine", "EngineError", "Request", "Output", "from_config", "LONG_PROMPT", "QUERY_MODES",
           "Decoding", "Scorer", "PerplexityResult", "windows", "EngineProcessor", "processor_for",
           "passages_from_hits"]
