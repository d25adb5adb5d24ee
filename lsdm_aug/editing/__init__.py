"""The edit path of :class:`~lsdm_aug.pipeline.LSDMPipeline`: a window planned in millimetres, resampled from the
image's pixel spacing to the model's and back, and blended so that only the footprint changes."""

from lsdm_aug.editing.window import EditWindow, ModelGrid, SpacingError, check_spacing, plan_window

__all__ = ["EditWindow", "ModelGrid", "SpacingError", "check_spacing", "plan_window"]
