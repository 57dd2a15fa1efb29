"""The shared harness: forward wrappers, the method registry and its method families, metrics, the runner and the
report.

Importing the package registers every method family: :mod:`.nad`, :mod:`.clip_baselines`,
:mod:`.captum_methods`, :mod:`.floors`, :mod:`.vit_methods`, and :mod:`.lrp` when zennit is installed (without
it ``lrp_zennit`` is not registered and asking for it says what to install).
"""
from ..readout import LinearReadout, TextSimilarity, ZeroShotClassifier
from . import captum_methods, clip_baselines, floors, metrics, nad, registry, vit_methods
from .captum_methods import CaptumSettings
from .registry import (Explanation, Method, MethodUnavailableError, available_methods, explain, get_method,
                       import_family, mark_unavailable, register_method, to_pixel_map)
from .runner import BenchmarkConfig, run_benchmark

import_family(f"{__name__}.lrp", ("lrp_zennit",), needs="zennit", extra="zennit")

__all__ = ["LinearReadout", "ZeroShotClassifier", "TextSimilarity", "registry", "metrics", "nad", "clip_baselines",
           "captum_methods", "floors", "vit_methods", "register_method", "get_method", "explain", "to_pixel_map",
           "available_methods", "mark_unavailable", "import_family", "Method", "Explanation", "MethodUnavailableError",
           "CaptumSettings", "BenchmarkConfig", "run_benchmark"]
