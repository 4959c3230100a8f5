"""Sending DICOM files to a PACS with C-STORE (pynetdicom).

:func:`send_files` checks every file before connecting, then opens one association, stores
each instance and returns its status as the PACS reported it. Nothing is ever reported as
stored without a success (or warning) status from the PACS: a refused connection, an unknown
host, a rejected or timed-out association raise :class:`PacsError` before anything is sent;
an instance without a response (timeout, dropped association) or with a failure status is
reported as failed.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import pydicom

from ..errors import InputError, MedDiffSegError, PacsError

DEFAULT_CALLING_AET = "MEDDIFFSEG"
DEFAULT_TIMEOUT_S = 30.0
# Store statuses that mean "stored" (PS3.4 Annex B.2.3): success and the three warnings.
_WARNINGS = {0xB000: "coercion of data elements", 0xB006: "elements discarded", 0xB007: "data set does not match SOP class"}


@dataclass
class StoreResult:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    status: int | None  # the PACS's status code; None when no response came
    stored: bool
    message: str

    @property
    def sop_class_name(self) -> str:
        return pydicom.uid.UID(self.sop_class_uid).name


@dataclass
class _Instance:
    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def _check_aet(value: str, what: str) -> str:
    aet = str(value).strip()
    if not 1 <= len(aet) <= 16 or "\\" in aet or any(ord(c) < 32 or ord(c) > 126 for c in aet):
        raise MedDiffSegError(f"{what} {value!r} is not a valid AE title (1 to 16 printable ASCII characters, no backslash)")
    return aet


def _read_instance(path: str | os.PathLike) -> _Instance:
    shown = os.fspath(path)
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{shown} is a folder; pass the DICOM files to send")
    if not p.is_file():
        raise InputError(f"{shown} does not exist")
    try:
        ds = pydicom.dcmread(str(p), stop_before_pixels=True)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{shown} is not a DICOM file ({exc})") from exc
    meta = getattr(ds, "file_meta", None)
    sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
    sop_instance = str(ds.get("SOPInstanceUID", "") or (meta.get("MediaStorageSOPInstanceUID", "") if meta else ""))
    syntax = str(meta.get("TransferSyntaxUID", "")) if meta else ""
    if not sop_class or not sop_instance:
        raise InputError(f"{shown} has no SOP Class/Instance UID: it cannot be stored")
    if not syntax:
        raise InputError(f"{shown} has no transfer syntax in its file meta information (not a DICOM Part 10 file)")
    return _Instance(shown, sop_class, sop_instance, syntax)


@contextmanager
def _quiet_pynetdicom() -> Iterator[None]:
    """pynetdicom logs every failure itself; this module reports them as exceptions and results."""
    logger = logging.getLogger("pynetdicom")
    previous = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _probe(host: str, port: int, timeout: float, where: str) -> None:
    """Fail fast, with the reason, when nothing accepts TCP connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise PacsError(f"cannot reach {where}: unknown host {host!r} ({exc.strerror or exc})") from None
    except ConnectionRefusedError:
        raise PacsError(f"cannot reach {where}: connection refused (no DICOM service listens on port {port}); "
                        "nothing was sent") from None
    except (socket.timeout, TimeoutError):
        raise PacsError(f"cannot reach {where}: no answer within {timeout:g} s; nothing was sent") from None
    except OSError as exc:
        raise PacsError(f"cannot reach {where}: {exc.strerror or exc}; nothing was sent") from None


def _status_text(code: int) -> str:
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

    known = STORAGE_SERVICE_CLASS_STATUS.get(code)
    if known:
        return f"{known[0]}: {known[1]}"
    return code_to_category(code)


def send_files(
    files: Sequence[str | os.PathLike],
    host: str,
    port: int,
    called_aet: str,
    *,
    calling_aet: str = DEFAULT_CALLING_AET,
    timeout: float = DEFAULT_TIMEOUT_S,
) -> list[StoreResult]:
    """C-STORE ``files`` to the PACS ``called_aet`` at ``host:port``; one result per file, in order.

    ``timeout`` (seconds) bounds connecting, the association negotiation and each store's
    response. Raises :class:`InputError` for unreadable files (before connecting) and
    :class:`PacsError` when no association can be made (nothing sent then). Failed stores are
    returned with ``stored=False``; the caller decides what that means (the CLI exits non-zero).
    """
    from pynetdicom import AE
    from pynetdicom.presentation import build_context
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    if not files:
        raise InputError("no files to send")
    called = _check_aet(called_aet, "called AE title")
    calling = _check_aet(calling_aet, "calling AE title")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise MedDiffSegError(f"port must be an integer 1..65535, got {port!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise MedDiffSegError(f"timeout must be a positive number of seconds, got {timeout!r}")
    timeout = float(timeout)
    instances = [_read_instance(f) for f in files]

    syntaxes: dict[str, list[str]] = {}
    for inst in instances:
        wanted = syntaxes.setdefault(inst.sop_class_uid, [])
        for ts in (inst.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            if ts not in wanted:
                wanted.append(ts)
    if len(syntaxes) > 128:
        raise InputError(f"{len(syntaxes)} different SOP classes: at most 128 fit one association; send fewer files at once")

    where = f"{called}@{host}:{port}"
    _probe(host, port, timeout, where)

    ae = AE(ae_title=calling)
    ae.connection_timeout = timeout
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    contexts = [build_context(sop_class, ts) for sop_class, ts in syntaxes.items()]
    results: list[StoreResult] = []
    with _quiet_pynetdicom():
        started = time.monotonic()
        assoc = ae.associate(host, port, contexts=contexts, ae_title=called)
        if not assoc.is_established:
            if assoc.is_rejected:
                raise PacsError(f"{where} rejected the association (check the called AE title {called!r} and that "
                                f"the PACS accepts the calling AE title {calling!r}); nothing was sent")
            if time.monotonic() - started >= timeout * 0.9:
                raise PacsError(f"{where} did not answer the association request within {timeout:g} s; nothing was sent")
            raise PacsError(f"{where} aborted or dropped the association request; nothing was sent")
        try:
            accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
            for inst in instances:
                if inst.sop_class_uid not in accepted:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, None, False,
                                               f"not sent: the PACS does not accept "
                                               f"{pydicom.uid.UID(inst.sop_class_uid).name}"))
                    continue
                if not assoc.is_established:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, None, False,
                                               "not sent: the association was lost"))
                    continue
                try:
                    status = assoc.send_c_store(inst.path)
                except (ValueError, RuntimeError, OSError) as exc:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, None, False,
                                               f"not sent: {exc}"))
                    continue
                code = int(status.Status) if status is not None and "Status" in status else None
                if code is None:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, None, False,
                                               f"no response within {timeout:g} s (timeout or association aborted); "
                                               "not known to be stored"))
                elif code == 0x0000:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, code, True, "stored"))
                elif code in _WARNINGS:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, code, True,
                                               f"stored with warning ({_WARNINGS[code]})"))
                else:
                    results.append(StoreResult(inst.path, inst.sop_class_uid, inst.sop_instance_uid, code, False,
                                               f"refused: {_status_text(code)}"))
        finally:
            if assoc.is_established:
                assoc.release()
    return results
