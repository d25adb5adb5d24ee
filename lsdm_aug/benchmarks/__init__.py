"""Benchmarks behind ``lsdm-aug benchmark``: each writes Markdown + JSON into a report folder.

Example:
    >>> from lsdm_aug.benchmarks.speed import SpeedSettings, run_speed
    >>> report = run_speed(SpeedSettings(model="default", out="reports/speed"))  # doctest: +SKIP
"""
