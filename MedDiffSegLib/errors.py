"""Error types. Every error a user can cause derives from :class:`MedDiffSegError`.

The CLI turns these into one readable line on stderr and a non-zero exit code; the
Slicer module shows the message in a dialog. Messages never contain patient data
(names, IDs, dates): only paths the user gave, shapes and codes.
"""


class MedDiffSegError(Exception):
    """Base class for errors caused by inputs, models or the environment (not bugs)."""

    exit_code = 1


class InputError(MedDiffSegError):
    """The input image or folder cannot be used (missing, unreadable, wrong dimension...)."""

    exit_code = 2


class ModelError(MedDiffSegError):
    """A model package is missing, malformed, does not match its hash, does not know an organ, or is
    made for another modality than the input (:class:`ModalityMismatchError`)."""

    exit_code = 3


class ModalityMismatchError(ModelError):
    """The model is made for another modality (CT or MR) than the input (see :mod:`MedDiffSegLib.modality`)."""


class DeviceError(MedDiffSegError):
    """The requested compute device is not available."""

    exit_code = 4


class OutputError(MedDiffSegError):
    """The output location cannot be written."""

    exit_code = 5


class PacsError(MedDiffSegError):
    """The PACS cannot be reached, refuses the association, or did not store every instance."""

    exit_code = 6


class Cancelled(MedDiffSegError):
    """The run was cancelled by the user (progress callback asked to stop)."""

    exit_code = 130
