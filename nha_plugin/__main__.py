"""``python -m nha_plugin ...`` runs the ``nha`` command."""
import sys

from .cli import main

sys.exit(main())
