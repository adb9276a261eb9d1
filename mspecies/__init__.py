"""mspecies: M-style particle operations for cryo-ET inside Scipion.

The Scipion ``Plugin`` class lives in :mod:`mspecies.plugin` and is exposed here lazily
(PEP 562), so that ``import mspecies.core`` or ``python -m mspecies synth`` never loads
pyworkflow, pwem or tomo. Scipion finds the plugin through the ``pyworkflow.plugin``
entry point and reads ``mspecies.Plugin`` as an attribute, which triggers the import.
"""

__version__ = "0.1.0"
_logo = "icon.png"
_references = ["mspecies2026", "Tegunov2021"]


def __getattr__(name: str):
    if name == "Plugin":
        from .plugin import Plugin

        return Plugin
    raise AttributeError(f"module 'mspecies' has no attribute {name!r}")
