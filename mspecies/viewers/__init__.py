"""mspecies viewers (discovered by pyworkflow as attributes of this module)."""

from .viewer_export import MSpeciesExportViewer
from .viewer_intersect import MSpeciesIntersectViewer

__all__ = ["MSpeciesExportViewer", "MSpeciesIntersectViewer"]
