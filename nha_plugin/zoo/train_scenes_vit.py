"""Train the bundled planted-concept CLIP-ViT ``scenes-vit``: :mod:`nha_plugin.zoo.train_scenes_rn` with
``--model scenes-vit`` (same recipe, options and resume guarantee; defaults from ``scenes-vit.json``).

Usage:
    python -m nha_plugin.zoo.train_scenes_vit --checkpoint ckpt.safetensors   # the shipped run
    python -m nha_plugin.zoo.train_scenes_vit --evaluate-only --eval-seed 2000 --eval-n 1000
"""

from __future__ import annotations

import sys
from typing import Dict, Optional, Sequence

from nha_plugin.zoo import train_scenes_rn


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the training script for ``scenes-vit``; ``argv`` and the result as for :func:`train_scenes_rn.main`."""
    return train_scenes_rn.main(["--model", "scenes-vit", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(train_scenes_rn.run_cli(["--model", "scenes-vit", *sys.argv[1:]]))
