"""The synthetic tilt-series dataset with known ground truth: phantom map (:mod:`.phantom`), analytic
projections with CTF, dose and noise, every file format the importers read (:mod:`.dataset`), the binned
tomogram (:mod:`.wbp`), a self-check that uses only the written files (:mod:`.check`), and the manifest's readers
(:mod:`.manifest`, light: the export reads a manifest without loading the generator).

Test data, not engine: it may use core (numerics) and formats (files); core and formats never import it.
"""
