"""Labelled datasets described by a ``dataset.json`` (Medical Segmentation Decathlon / nnU-Net style).

Two layouts are read:

- **Decathlon (MSD) / nnU-Net v1**: ``"training": [{"image": "./imagesTr/a.nii.gz",
  "label": "./labelsTr/a.nii.gz"}, ...]``, ``"labels": {"0": "background", "1": "liver"}``
  (value → name) and ``"modality": {"0": "CT"}``. Paths are relative to the folder holding
  ``dataset.json``.
- **nnU-Net v2**: no file list; ``"labels": {"background": 0, "liver": 1}`` (name → value),
  ``"channel_names": {"0": "CT"}``, ``"file_ending": ".nii.gz"``; cases are the files of
  ``labelsTr/`` with images ``imagesTr/<case>_0000<file_ending>``.

An optional ``"validation"`` list (same form as ``"training"``; written by
:func:`make_dataset`, ignored by other tools) holds cases kept out of training.

MedDiffSeg segments single-channel CT or MR: datasets with several input channels are
refused. Label values map to organ names through the dataset's own table, so datasets with
different code tables can be mixed in one training.

:func:`make_dataset` writes such a ``dataset.json`` from a folder of images, a folder of
label maps and a label table (CSV or JSON, name → value), pairing files by name.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from ..errors import InputError, MedDiffSegError, OutputError
from ..jsonfile import read_json_object

#: File name endings read as volumes (longest first so ".nii.gz" wins over ".gz").
VOLUME_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
SPLITS = ("training", "validation")

_MR_NAMES = {"MR", "MRI", "T1", "T1W", "T2", "T2W", "FLAIR", "ADC", "DWI", "PD", "T1C", "T1GD", "T1CE", "PDW"}
_CT_NAMES = {"CT", "NONCT", "NON-CT"}


class DatasetError(MedDiffSegError):
    """A dataset description or folder cannot be used (exit code 2, like an input problem)."""

    exit_code = InputError.exit_code


@dataclass
class Case:
    name: str
    image: Path
    label: Path


@dataclass
class Dataset:
    """A parsed ``dataset.json``: cases per split, the label table and the modality."""

    path: Path
    name: str
    modality: str  # "CT" or "MR"
    labels: dict[str, int]  # organ name -> label value (background excluded)
    splits: dict[str, list[Case]] = field(default_factory=dict)

    def cases(self, split: str = "training") -> list[Case]:
        if split not in SPLITS:
            raise DatasetError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        return list(self.splits.get(split, []))


def modality_of(name: str) -> str:
    """Map a dataset's channel name (``CT``, ``MRI``, ``T2``, ``ADC`` ...) to ``"CT"`` or ``"MR"``."""
    key = str(name).strip().upper().replace(" ", "")
    if key in _CT_NAMES:
        return "CT"
    if key in _MR_NAMES or key.startswith("MR") or key.startswith("T1") or key.startswith("T2"):
        return "MR"
    raise DatasetError(f"unknown modality {name!r}: MedDiffSeg handles CT and MR (MRI, T1, T2, FLAIR, ADC ...)")


def volume_stem(path: str | os.PathLike) -> str | None:
    """The file name without its volume ending (``a.nii.gz`` → ``a``), or None if not a volume file."""
    name = Path(path).name
    low = name.lower()
    for ending in VOLUME_ENDINGS:
        if low.endswith(ending) and len(name) > len(ending):
            return name[: -len(ending)]
    return None


# -- label tables ------------------------------------------------------------------------------


def _as_label_value(value, where: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{where}: label value {value!r} is not a number") from None
    if not f.is_integer():
        raise DatasetError(f"{where}: label value {value!r} is not an integer")
    return int(f)


def normalise_label_table(raw: dict, where: str) -> dict[str, int]:
    """``{name: value}`` or ``{value: name}`` (Decathlon style) → ``{name: value}`` without background.

    Values must be integers >= 1 (0 is background and is dropped when named "background");
    names and values must be unique.
    """
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{where}: the label table must be a non-empty mapping of names to values")
    keys_numeric = all(re.fullmatch(r"\s*-?\d+\s*", str(k)) for k in raw)
    values_numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) or
                         (isinstance(v, str) and re.fullmatch(r"\s*-?\d+\s*", v)) for v in raw.values())
    if any(isinstance(v, (list, tuple, dict)) for v in raw.values()):
        raise DatasetError(f"{where}: region-based labels (lists of values) are not supported; "
                           "give one value per label")
    if keys_numeric and not values_numeric:
        pairs = [(str(v).strip(), _as_label_value(k, where)) for k, v in raw.items()]  # value -> name
    else:
        pairs = [(str(k).strip(), _as_label_value(v, where)) for k, v in raw.items()]  # name -> value
    table: dict[str, int] = {}
    seen: dict[int, str] = {}
    for name, value in pairs:
        if not name:
            raise DatasetError(f"{where}: a label has an empty name")
        if value == 0:
            if name.lower() in ("background", "bg", "0"):
                continue
            raise DatasetError(f"{where}: label {name!r} has value 0, which is background")
        if value < 0:
            raise DatasetError(f"{where}: label {name!r} has a negative value {value}")
        if name in table:
            raise DatasetError(f"{where}: label name {name!r} appears twice")
        if value in seen:
            raise DatasetError(f"{where}: labels {seen[value]!r} and {name!r} share the value {value}")
        table[name] = value
        seen[value] = name
    if not table:
        raise DatasetError(f"{where}: the label table names no label besides background")
    return table


def read_label_table(path: str | os.PathLike) -> dict[str, int]:
    """Read a label table: JSON ``{"liver": 1, ...}`` (or ``{"1": "liver"}``), or CSV rows ``name,value``.

    A CSV may have a header row (e.g. ``name,value``) and the columns in either order
    (``value,name`` is recognised by the numeric column). ``#`` starts a comment line.
    """
    p = Path(path)
    shown = os.fspath(path)
    if not p.is_file():
        raise DatasetError(f"label table {shown} does not exist")
    text = p.read_text(encoding="utf-8-sig")
    if p.suffix.lower() == ".json" or text.lstrip().startswith("{"):
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"label table {shown} is not valid JSON ({exc})") from None
        if isinstance(raw, dict) and "labels" in raw and isinstance(raw["labels"], dict):
            raw = raw["labels"]  # a dataset.json given as the table
        return normalise_label_table(raw, f"label table {shown}")
    rows = [r for r in csv.reader(io.StringIO(text)) if r and any(c.strip() for c in r)
            and not r[0].lstrip().startswith("#")]
    pairs: dict[str, int] = {}
    for i, row in enumerate(rows, 1):
        cells = [c.strip() for c in row if c.strip()]
        if len(cells) != 2:
            raise DatasetError(f"label table {shown}, row {i}: expected two columns (name, value), got {row}")
        a_num, b_num = (bool(re.fullmatch(r"-?\d+(\.0*)?", c)) for c in cells)
        if not a_num and not b_num:
            if i == 1:
                continue  # header row
            raise DatasetError(f"label table {shown}, row {i}: no numeric label value in {row}")
        name, value = (cells[1], cells[0]) if a_num and not b_num else (cells[0], cells[1])
        if name in pairs:
            raise DatasetError(f"label table {shown}: label name {name!r} appears twice")
        pairs[name] = _as_label_value(value, f"label table {shown}, row {i}")
    return normalise_label_table(pairs, f"label table {shown}")


# -- reading dataset.json ----------------------------------------------------------------------


def _case_from_entry(entry, root: Path, where: str, index: int) -> Case:
    if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
        raise DatasetError(f"{where}: entry {index} must be an object with 'image' and 'label', got {entry!r}")
    image, label = entry["image"], entry["label"]
    if isinstance(image, list):
        if len(image) != 1:
            raise DatasetError(f"{where}: entry {index} has {len(image)} image channels; MedDiffSeg trains on "
                               "single-channel CT or MR")
        image = image[0]
    img = Path(image) if Path(image).is_absolute() else root / image
    lab = Path(label) if Path(label).is_absolute() else root / label
    name = entry.get("name") or volume_stem(lab) or lab.name
    return Case(str(name), img, lab)


def _channels(meta: dict, where: str) -> str:
    chans = meta.get("channel_names", meta.get("modality"))
    if chans is None:
        raise DatasetError(f"{where} names no modality ('modality' or 'channel_names', e.g. {{\"0\": \"CT\"}})")
    if isinstance(chans, str):
        return modality_of(chans)
    if not isinstance(chans, dict) or not chans:
        raise DatasetError(f"{where}: 'modality'/'channel_names' must map channel numbers to names, got {chans!r}")
    if len(chans) != 1:
        raise DatasetError(f"{where} has {len(chans)} input channels ({', '.join(map(str, chans.values()))}); "
                           "MedDiffSeg trains on single-channel CT or MR")
    return modality_of(next(iter(chans.values())))


def read_dataset(path: str | os.PathLike, *, check_files: bool = True) -> Dataset:
    """Parse a Decathlon / nnU-Net ``dataset.json`` (``path`` may also be its folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / "dataset.json"
    shown = os.fspath(p)
    if not p.is_file():
        raise DatasetError(f"dataset description {shown} does not exist")
    meta = read_json_object(p, DatasetError, shown=shown, encoding="utf-8-sig")
    root = p.parent
    modality = _channels(meta, shown)
    if "labels" not in meta:
        raise DatasetError(f"{shown} has no 'labels' table")
    labels = normalise_label_table(meta["labels"], f"{shown} 'labels'")
    splits: dict[str, list[Case]] = {}
    if "training" in meta:
        for split in SPLITS:
            entries = meta.get(split, [])
            if not isinstance(entries, list):
                raise DatasetError(f"{shown}: '{split}' must be a list")
            splits[split] = [_case_from_entry(e, root, f"{shown} '{split}'", i) for i, e in enumerate(entries)]
    else:  # nnU-Net v2: files in imagesTr/ and labelsTr/
        ending = str(meta.get("file_ending", ".nii.gz"))
        labels_dir, images_dir = root / "labelsTr", root / "imagesTr"
        if not labels_dir.is_dir():
            raise DatasetError(f"{shown} lists no 'training' cases and {labels_dir} does not exist")
        cases = []
        for lab in sorted(labels_dir.iterdir()):
            if lab.name.startswith(".") or not lab.name.endswith(ending):
                continue
            case = lab.name[: -len(ending)]
            cases.append(Case(case, images_dir / f"{case}_0000{ending}", lab))
        splits["training"] = cases
        splits["validation"] = []
    if not splits.get("training") and not splits.get("validation"):
        raise DatasetError(f"{shown} lists no cases")
    names = [c.name for s in splits.values() for c in s]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise DatasetError(f"{shown}: case name(s) used twice: {', '.join(dup[:10])}")
    if check_files:
        missing = [str(f) for s in splits.values() for c in s for f in (c.image, c.label) if not f.exists()]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{shown} refers to missing files: {', '.join(missing[:5])}{more}")
    return Dataset(p, str(meta.get("name", root.name)), modality, labels, splits)


# -- writing dataset.json from folders --------------------------------------------------------


def _list_volumes(folder: Path, what: str) -> tuple[dict[str, Path], list[str]]:
    """Volume files (and DICOM-series subfolders) of ``folder`` by stem; also the names ignored."""
    if not folder.is_dir():
        raise DatasetError(f"{what} folder {folder} does not exist or is not a folder")
    found: dict[str, Path] = {}
    ignored: list[str] = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            stem = entry.name  # a folder holding one DICOM series
        else:
            stem = volume_stem(entry)
            if stem is None:
                ignored.append(entry.name)
                continue
        if stem in found:
            raise DatasetError(f"{what} folder {folder} holds two volumes named {stem!r}: "
                               f"{found[stem].name} and {entry.name}")
        found[stem] = entry
    if not found:
        raise DatasetError(f"{what} folder {folder} holds no volume files ({', '.join(VOLUME_ENDINGS)}) "
                           "or DICOM series folders")
    return found, ignored


def pair_by_stem(images: dict[str, Path], labels: dict[str, Path]) -> list[Case]:
    """Pair image and label files by stem; an image stem ending in ``_0000`` (nnU-Net) also matches.

    Every unpaired file is an error, listed by name.
    """
    pairs: list[Case] = []
    used_labels: set[str] = set()
    lonely_images: list[str] = []
    for stem, img in images.items():
        key = stem if stem in labels else (stem[:-5] if stem.endswith("_0000") and stem[:-5] in labels else None)
        if key is None or key in used_labels:
            lonely_images.append(img.name)
            continue
        used_labels.add(key)
        pairs.append(Case(key, img, labels[key]))
    lonely_labels = [labels[s].name for s in labels if s not in used_labels]
    if lonely_images or lonely_labels:
        parts = []
        if lonely_images:
            parts.append(f"{len(lonely_images)} image(s) without a label map: {', '.join(lonely_images[:10])}"
                         + (" ..." if len(lonely_images) > 10 else ""))
        if lonely_labels:
            parts.append(f"{len(lonely_labels)} label map(s) without an image: {', '.join(lonely_labels[:10])}"
                         + (" ..." if len(lonely_labels) > 10 else ""))
        raise DatasetError("cannot pair images and label maps by file name (without extension): " + "; ".join(parts))
    return sorted(pairs, key=lambda c: c.name)


def _rel(path: Path, root: Path) -> str:
    # abspath, not resolve: keep symbolic links as the user laid them out
    try:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    except ValueError:  # another drive on Windows
        return Path(os.path.abspath(path)).as_posix()
    rel = Path(rel).as_posix()
    return rel if rel.startswith("..") else f"./{rel}"


def _check_pair(case: Case) -> str | None:
    """Header-level sanity check of one pair; returns a problem description or None."""
    import SimpleITK as sitk

    from ..io import read_volume

    if case.image.is_dir():
        try:
            image = read_volume(case.image)
        except InputError as exc:
            return str(exc)
        isize, ispacing = image.GetSize(), image.GetSpacing()
    else:
        r = sitk.ImageFileReader()
        r.SetFileName(str(case.image))
        try:
            r.ReadImageInformation()
        except RuntimeError:
            return f"image {case.image} cannot be read"
        if r.GetDimension() != 3 or r.GetNumberOfComponents() != 1:
            return f"image {case.image} is not a single-channel 3D volume"
        isize, ispacing = r.GetSize(), r.GetSpacing()
    r = sitk.ImageFileReader()
    r.SetFileName(str(case.label))
    try:
        r.ReadImageInformation()
    except RuntimeError:
        return f"label map {case.label} cannot be read"
    if r.GetDimension() != 3:
        return f"label map {case.label} is not 3D"
    if r.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        return None  # float label maps are accepted when their values are integers (checked at load)
    lsize, lspacing = r.GetSize(), r.GetSpacing()
    if sorted(lsize) != sorted(isize) or not np.allclose(sorted(lspacing), sorted(ispacing), rtol=1e-3, atol=1e-4):
        return (f"label map {case.label.name} ({'×'.join(map(str, lsize))} voxels) does not match image "
                f"{case.image.name} ({'×'.join(map(str, isize))} voxels) in size or spacing")
    return None


def make_dataset(
    images_dir: str | os.PathLike,
    labels_dir: str | os.PathLike,
    table: str | os.PathLike | dict[str, int],
    out: str | os.PathLike,
    *,
    modality: str,
    name: str | None = None,
    description: str = "",
    validation_cases: Iterable[str] = (),
    validation_fraction: float = 0.0,
    seed: int = 0,
    check: bool = True,
    overwrite: bool = False,
) -> Dataset:
    """Write a Decathlon-style ``dataset.json`` pairing ``images_dir`` and ``labels_dir`` by file name.

    ``table`` is a label-table file (see :func:`read_label_table`) or a ``{name: value}`` dict.
    Cases named in ``validation_cases``, plus a seeded random ``validation_fraction`` of the
    rest, go to the ``"validation"`` list instead of ``"training"``. With ``check`` each pair's
    headers are read: unreadable files and label maps whose size or spacing differ from their
    image are errors. Paths are written relative to the folder of ``out``.
    """
    mod = modality_of(modality)
    labels = normalise_label_table(table, "label table") if isinstance(table, dict) else read_label_table(table)
    out = Path(out)
    if out.is_dir():
        out = out / "dataset.json"
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; choose another path or allow overwriting")
    images, _ = _list_volumes(Path(images_dir), "images")
    label_maps, _ = _list_volumes(Path(labels_dir), "label")
    cases = pair_by_stem(images, label_maps)
    if check:
        problems = [p for p in (_check_pair(c) for c in cases) if p]
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise DatasetError("; ".join(problems[:5]) + more)
    by_name = {c.name: c for c in cases}
    val = list(dict.fromkeys(validation_cases))
    unknown = [v for v in val if v not in by_name]
    if unknown:
        raise DatasetError(f"validation case(s) not found: {', '.join(unknown)} (cases: {', '.join(list(by_name)[:10])} ...)")
    if not 0.0 <= validation_fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {validation_fraction}")
    rest = [c.name for c in cases if c.name not in val]
    n_extra = int(round(validation_fraction * len(cases)))
    if n_extra:
        rng = np.random.default_rng(seed)
        val += [rest[i] for i in sorted(rng.choice(len(rest), size=min(n_extra, len(rest) - 1), replace=False))]
    val_set = set(val)
    train_cases = [c for c in cases if c.name not in val_set]
    if not train_cases:
        raise DatasetError("no case is left for training after taking the validation cases")
    root = out.parent
    root.mkdir(parents=True, exist_ok=True)

    def entries(cs):
        return [{"name": c.name, "image": _rel(c.image, root), "label": _rel(c.label, root)} for c in cs]

    val_cases = [by_name[v] for v in sorted(val_set)]
    meta = {
        "name": name or root.name,
        "description": description,
        "modality": {"0": mod},
        "labels": {"0": "background", **{str(v): k for k, v in sorted(labels.items(), key=lambda kv: kv[1])}},
        "numTraining": len(train_cases),
        "numValidation": len(val_cases),
        "training": entries(train_cases),
        "validation": entries(val_cases),
    }
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {out}: {exc.strerror or exc}") from None
    return read_dataset(out)
