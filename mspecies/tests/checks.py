"""Shared assertions for the headless Scipion protocol tests."""


def registered_outputs(prot) -> list[str]:
    """Names of the outputs a protocol registered with ``_defineOutputs``.

    Reads the protocol's output list and looks for attributes named like its possible outputs.
    ``iterOutputAttributes()`` is not used: for a protocol without outputs pyworkflow falls back to an
    "any EMObject attribute is an output" scan whose result depends on what other tests imported.
    """
    names = [str(name) for name in prot._outputs]
    possible = prot.getPossibleOutputs() or {}
    keys = possible.keys() if isinstance(possible, dict) else [member.name for member in possible]
    return names + [key for key in keys if key not in names and getattr(prot, key, None) is not None]
