"""The ``nha`` command line: one module per sub-command (``demo`` and the dispatcher in :mod:`.main`; ``describe``,
``benchmark``, ``stats``/``sparsity``, ``segment``, ``shift``, ``textspan``/``spurious``, ``neurons``), each with
``add_parser(subparsers)`` and ``run(args) -> int``, and :mod:`.common` for what they share."""
from .main import demo, main

__all__ = ["main", "demo"]
