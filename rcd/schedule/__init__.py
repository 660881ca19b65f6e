"""The "when" axis: schedules that decide at which decoding steps retrieval fires.

``SCHEDULES`` maps config-group names (``strategy/schedule=<name>``) to classes;
:func:`scheduled` wraps a logits control with a schedule for ``model.generate``.
"""
from rcd.schedule.adaptive import Adaptive
from rcd.schedule.base import Schedule
from rcd.schedule.every_n import EveryN
from rcd.schedule.every_token import EveryToken
from rcd.schedule.once import Once
from rcd.schedule.scheduled import ScheduledControl, scheduled
from rcd.schedule.sentence import Sentence, decode_vocab

SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls for cls in (Once, EveryN, Sentence, Adaptive, EveryToken)
}

__all__ = ["Schedule", "Once", "EveryN", "Sentence", "Adaptive", "EveryToken", "SCHEDULES", "decode_vocab",
           "ScheduledControl", "scheduled"]
