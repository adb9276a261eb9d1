"""mspecies Scipion protocols (discovered by pyworkflow as attributes of this module)."""

from .protocol_base import ProtMSpeciesTsFileImportBase
from .protocol_export_star import ProtMSpeciesExportParticlesStar
from .protocol_export_subtomograms import ProtMSpeciesExportSubtomograms
from .protocol_import_alignment import ProtMSpeciesImportTsAlignment
from .protocol_import_ctf import ProtMSpeciesImportTsCtf
from .protocol_import_star import ProtMSpeciesImportParticlesStar
from .protocol_import_tilt_series import ProtMSpeciesImportTiltSeries
from .protocol_intersect import ProtMSpeciesIntersect

__all__ = ["ProtMSpeciesExportParticlesStar", "ProtMSpeciesExportSubtomograms",
           "ProtMSpeciesImportParticlesStar",
           "ProtMSpeciesImportTiltSeries", "ProtMSpeciesImportTsAlignment",
           "ProtMSpeciesImportTsCtf", "ProtMSpeciesIntersect", "ProtMSpeciesTsFileImportBase"]
