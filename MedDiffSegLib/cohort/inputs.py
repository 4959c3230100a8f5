"""The studies of a batch: from a folder of volumes, a folder of DICOM series, or a CSV table.

A *study* is one input of ``meddiffseg segment`` (a volume file or a folder with one DICOM
series) with an id. Its outputs go to ``DIR/<id>/``, so an id must be a safe folder name:
:func:`safe_id` keeps letters, digits, ``.``, ``_`` and ``-`` and replaces every other run of
characters by ``_`` (no leading dot: hidden names are the batch's own). Two studies whose safe
ids are equal, also when they differ only in case (one folder on macOS and Windows), are refused
before anything runs, naming both.

Nothing is read here but folder listings, the CSV, and file magic: every problem with a study's
data is that study's error when it runs, and never stops the batch.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, MedDiffSegError
from ..modality import normalise_modality

#: File name endings taken as volumes in a folder of studies (the part before them is the id).
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
#: Data files that belong to a header beside them (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``).
_COMPANION_SUFFIXES = (".raw", ".raw.gz", ".zraw")
#: Names inside the output folder that belong to the batch itself.
RESERVED_IDS = frozenset({"batch.csv"})
MAX_ID_LENGTH = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Study:
    """One input of the batch: ``path`` is absolute; ``modality`` is what the CSV declares (or None)."""

    id: str
    path: Path
    modality: str | None = None
    source: str = ""  # where it was listed: "line N" of the CSV or the entry's name in the folder

    def to_dict(self) -> dict:
        return {"id": self.id, "path": str(self.path), "modality": self.modality, "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Study":
        return cls(id=d["id"], path=Path(d["path"]), modality=d.get("modality"), source=d.get("source", ""))


def safe_id(raw: str) -> str:
    """``raw`` as a folder name: unsafe characters become ``_``, no leading dot, at most 120 characters."""
    text = _UNSAFE.sub("_", str(raw).strip()).lstrip(".")
    return text[:MAX_ID_LENGTH]


def _volume_stem(name: str) -> str | None:
    lower = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _is_dicom_file(path: Path) -> bool:
    from ..io.volume import _is_dicom_file as has_dicom_preamble

    return path.suffix.lower() == ".dcm" or has_dicom_preamble(path)


def _checked(entries: list[tuple[str, Path, str | None, str]], shown: str) -> list[Study]:
    """Studies from ``(raw id, path, modality, source)``, with safe ids; collisions are an InputError."""
    studies: list[Study] = []
    seen: dict[str, tuple[str, str]] = {}  # casefolded safe id -> (raw id, source)
    for raw, path, modality, source in entries:
        sid = safe_id(raw)
        if not sid or not sid.strip("_"):
            raise InputError(f"{shown}: study id {raw!r} ({source}) has no letter or digit to name its output folder")
        if sid.lower() in RESERVED_IDS:
            raise InputError(f"{shown}: study id {raw!r} ({source}) is reserved for the batch's own {sid}; rename it")
        key = sid.casefold()
        if key in seen:
            other_raw, other_source = seen[key]
            same = "the same id" if other_raw == raw else f"the same output folder {sid!r}"
            raise InputError(f"{shown}: studies {other_raw!r} ({other_source}) and {raw!r} ({source}) have {same} "
                             "(output folders are named after the ids; case does not tell folders apart on every "
                             "file system): rename one")
        seen[key] = (raw, source)
        studies.append(Study(sid, path, modality, source))
    if not studies:
        raise InputError(f"{shown} lists no studies")
    return studies


def studies_from_folder(folder: str | os.PathLike) -> list[Study]:
    """Every volume file (:data:`VOLUME_SUFFIXES`; the id is the name without it) and every subfolder
    (one DICOM series each; the id is its name) directly in ``folder``, in name order. Hidden entries
    and data files of a header (``.raw``) are left out; DICOM files directly in ``folder`` are an
    error (that is one series, not a folder of series)."""
    shown = os.fspath(folder)
    root = Path(folder).expanduser().absolute()
    if not root.is_dir():
        raise InputError(f"{shown} is not a folder")
    entries: list[tuple[str, Path, str | None, str]] = []
    dicom_files = 0
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            entries.append((entry.name, entry, None, f"folder {entry.name}"))
            continue
        stem = _volume_stem(entry.name)
        if stem is not None:
            entries.append((stem, entry, None, f"file {entry.name}"))
        elif not entry.name.lower().endswith(_COMPANION_SUFFIXES) and _is_dicom_file(entry):
            dicom_files += 1
    if dicom_files:
        raise InputError(
            f"{shown} holds DICOM files itself ({dicom_files}): that is one series, not a folder of studies. "
            "A batch takes a folder whose subfolders hold one series each (or volume files), or a CSV; "
            "to segment this one series use 'meddiffseg segment'")
    if not entries:
        raise InputError(f"{shown} holds no studies: expected volume files ({', '.join(VOLUME_SUFFIXES)}) or "
                         "subfolders with one DICOM series each")
    return _checked(entries, shown)


def studies_from_csv(table: str | os.PathLike) -> list[Study]:
    """Studies from a CSV of ``id,path[,modality]`` (a header row of those names is optional; blank
    lines and lines starting with ``#`` are skipped). A relative path is relative to the CSV's folder;
    ``modality`` is CT or MR or empty (then ``--modality``, or a DICOM series' own tag, applies)."""
    shown = os.fspath(table)
    path = Path(table).expanduser().absolute()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{shown} is not a UTF-8 text file (expected a CSV of id,path[,modality])") from None
    except OSError as exc:
        raise InputError(f"{shown} cannot be read: {exc.strerror or exc}") from None
    entries: list[tuple[str, Path, str | None, str]] = []
    try:
        rows = list(csv.reader(text.splitlines()))
    except csv.Error as exc:
        raise InputError(f"{shown} is not a valid CSV: {exc}") from None
    for number, row in enumerate(rows, start=1):
        cells = [c.strip() for c in row]
        while cells and not cells[-1]:
            cells.pop()
        if not cells or cells[0].startswith("#"):
            continue
        if number == 1 and [c.lower() for c in cells] in (["id", "path"], ["id", "path", "modality"]):
            continue
        where = f"line {number}"
        if len(cells) not in (2, 3):
            raise InputError(f"{shown}, {where}: expected id,path[,modality], got {len(cells)} column(s)")
        raw, rel = cells[0], cells[1]
        if not raw or not rel:
            raise InputError(f"{shown}, {where}: the {'id' if not raw else 'path'} is empty")
        try:
            modality = normalise_modality(cells[2] if len(cells) == 3 and cells[2] else None, "the modality")
        except MedDiffSegError as exc:
            raise InputError(f"{shown}, {where}: {exc}") from None
        study_path = Path(rel).expanduser()
        if not study_path.is_absolute():
            study_path = path.parent / study_path
        entries.append((raw, study_path, modality, where))
    return _checked(entries, shown)


def discover(inputs: str | os.PathLike) -> list[Study]:
    """The studies of ``inputs``: a CSV file (:func:`studies_from_csv`) or a folder (:func:`studies_from_folder`)."""
    p = Path(inputs).expanduser()
    if not p.exists():
        raise InputError(f"{os.fspath(inputs)} does not exist (expected a folder of volumes, a folder of DICOM "
                         "series, or a CSV of id,path[,modality])")
    if p.is_dir():
        return studies_from_folder(inputs)
    if _volume_stem(p.name) is not None or _is_dicom_file(p):
        raise InputError(f"{os.fspath(inputs)} is one image, not a list of studies: a batch takes a folder of volumes, "
                         "a folder of DICOM series or a CSV of id,path[,modality]; for one image use 'meddiffseg segment'")
    return studies_from_csv(inputs)
