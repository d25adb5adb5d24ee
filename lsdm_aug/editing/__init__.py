"""The edit path of :class:`~lsdm_aug.pipeline.LSDMPipeline`: a window planned in millimetres, resampled from the
image's pixel spacing to the model's and back, and blended so that only the footprint changes; a draw that
contradicts "not calcified" is drawn again."""

from lsdm_aug.editing.saturation import (DEFAULT_MAX_REDRAWS, NOT_CALCIFIED, SATURATED_HU, checked_max_redraws,
                                        is_saturated, redraw_seed, told_not_calcified)
from lsdm_aug.editing.window import EditWindow, ModelGrid, SpacingError, check_spacing, plan_window

__all__ = ["EditWindow", "ModelGrid", "SpacingError", "check_spacing", "plan_window", "NOT_CALCIFIED", "SATURATED_HU",
           "is_saturated", "redraw_seed", "told_not_calcified", "DEFAULT_MAX_REDRAWS", "checked_max_redraws"]
