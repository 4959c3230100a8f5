"""The ``meddiffseg`` command line: :func:`MedDiffSegLib.cli.main.main` (also ``python -m MedDiffSegLib``).

Subcommands live in :mod:`MedDiffSegLib.cli.main`; the work itself is done by the library
(:mod:`MedDiffSegLib.inference.pipeline`, :mod:`MedDiffSegLib.registry.store`).
"""
