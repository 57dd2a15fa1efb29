"""The ``nha`` command line: one module per sub-command (``demo``, ``describe``, ``benchmark``, ``stats``/``sparsity``,
``segment``, ``shift``, ``textspan``/``spurious``, ``neurons``), each with ``add_parser(subparsers)`` and
``run(args) -> int``; :mod:`.common` holds the command table and the handling of user mistakes, :mod:`.main` the
dispatcher."""
from .main import main

__all__ = ["main"]
