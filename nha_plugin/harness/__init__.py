"""The shared harness: forward wrappers, method registry, metrics, datasets, runner and report."""
from ..readout import LinearReadout, TextSimilarity, ZeroShotClassifier
from . import methods, metrics
from .methods import Explanation, Method, available_methods, explain, register_method
from .runner import BenchmarkConfig, run_benchmark

__all__ = ["LinearReadout", "ZeroShotClassifier", "TextSimilarity", "methods", "metrics", "register_method",
           "explain", "available_methods", "Method", "Explanation", "BenchmarkConfig", "run_benchmark"]
