"""The "how" axis: controls that turn retrieved evidence into changed generation.

Every control implements the engine protocol of :mod:`rcd.control.base` (a new control is one
class and one YAML file, ``strategy/control=<name>``). Logits controls are also transformers
``LogitsProcessor`` objects: they run inside a user's own ``model.generate(...,
logits_processor=[...])``, chain with transformers' processors and reset per call; wrap one with a
schedule with :func:`rcd.schedule.scheduled`.
"""
from rcd.control.base import ACTIONS, CallTracker, Control, ControlError, LogitsControl, check_protocol, masked_rows
from rcd.control.cad import ContextAwareDecoding, cad_logprobs
from rcd.control.context import ContextControl, Passage, PromptTemplate
from rcd.control.inject import InjectError, KNNAttention, KVInjection, PrefixKV
from rcd.control.lazy_kv import ChunkKV, LazyKVInjection
from rcd.control.knn import KNNInterpolation, interpolate, knn_log_probs
from rcd.control.replug import ReplugEnsemble, replug_mix
from rcd.control.span_filter import SpanFilter
from rcd.control.tag_bias import TagBias
from rcd.control.tag_context import TagContext
from rcd.control.token_context import TokenContext
from rcd.control.verify import Verify

__all__ = ["Control", "LogitsControl", "ControlError", "check_protocol", "ACTIONS", "CallTracker", "masked_rows",
           "ContextControl", "Passage", "PromptTemplate", "KVInjection", "KNNAttention", "PrefixKV", "InjectError",
           "KNNInterpolation", "knn_log_probs", "interpolate", "ReplugEnsemble", "replug_mix", "SpanFilter",
           "TagBias", "TagContext", "TokenContext", "LazyKVInjection", "ChunkKV", "Verify", "ContextAwareDecoding",
           "cad_logprobs"]
