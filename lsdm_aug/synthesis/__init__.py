"""Synthetic nodule datasets: ``lsdm-aug synthesize`` (one machine or a Ray cluster), its preview grid, and
nodule banks (``lsdm-aug bank build``).

Example:
    >>> from lsdm_aug.synthesis import SynthesisRequest, synthesize
    >>> synthesize("Dataset501_Malignant", SynthesisRequest(count=100, features={"malignancy": 4}))  # doctest: +SKIP
"""

from lsdm_aug.synthesis.bank import build_bank
from lsdm_aug.synthesis.dataset import SynthesisRequest, case_features, parse_level_option, synthesize

__all__ = ["SynthesisRequest", "synthesize", "case_features", "parse_level_option", "build_bank"]
