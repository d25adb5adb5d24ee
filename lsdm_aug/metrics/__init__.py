"""Measures of generated and downstream quality: lesion-level detection (FROC, CPM), the independent
nodule evaluators, and slice features for Fréchet distances without downloaded weights.

Example:
    >>> from lsdm_aug.metrics.detection import LUNA16_FP_RATES
    >>> LUNA16_FP_RATES[0]
    0.125
"""
