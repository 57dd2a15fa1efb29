"""The shared harness: forward wrappers that every attribution method (ours and Captum's) runs on."""
from ..readout import LinearReadout, TextSimilarity, ZeroShotClassifier

__all__ = ["LinearReadout", "ZeroShotClassifier", "TextSimilarity"]
