"""The paper pipeline: ``rcd-paper`` (:mod:`rcd.paper.cli`) runs the experiments of ``experiments/*.yaml``
through a Hydra launcher and writes tables, figures and ``paper/paper.md``."""
