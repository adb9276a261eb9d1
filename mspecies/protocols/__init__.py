"""mspecies Scipion protocols (discovered by pyworkflow as attributes of this module)."""

from .protocol_base import ProtMSpeciesTsFileImportBase
from .protocol_import_alignment import ProtMSpeciesImportTsAlignment
from .protocol_import_coordinates import ProtMSpeciesImportCoordinates3D
from .protocol_import_ctf import ProtMSpeciesImportTsCtf
from .protocol_import_tilt_series import ProtMSpeciesImportTiltSeries

__all__ = ["ProtMSpeciesImportCoordinates3D", "ProtMSpeciesImportTiltSeries", "ProtMSpeciesImportTsAlignment",
           "ProtMSpeciesImportTsCtf", "ProtMSpeciesTsFileImportBase"]
