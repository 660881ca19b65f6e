"""rcd: retrieval-controlled decoding. A strategy = what (datastore) × how (control) × when (schedule).

Public API: :mod:`rcd.control` (controls and their protocol), :mod:`rcd.schedule` (schedules and
:func:`rcd.schedule.scheduled`), :mod:`rcd.datastore` (datastores), :mod:`rcd.engine`
(:class:`~rcd.engine.Engine`, :class:`~rcd.engine.Request`), :func:`rcd.models.load_model`.
Entry points: ``python -m rcd.run``, ``python -m rcd.build``, ``python -m rcd.census``.
"""
