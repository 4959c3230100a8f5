"""A small real cohort for the batch tests, built in a temporary folder from ``$MEDDIFFSEG_DATA``.

Good studies (each small, so that a batch of them takes seconds): the TotalSegmentator example CT
(30 slices), the dcmqi 3-slice DICOM CT series, and three BTCV CTs cut to 8 slices through the
liver (copies; the data is only read). Bad ones: a cut BTCV CT truncated to a third of its bytes
(corrupt), a CHAOS MR declared MR (the CT model refuses it), and a whole BTCV CT above the batch's
``--max-voxels`` (refused from its header, before it is read).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

#: The voxel limit the tests pass: above every good study and the MR, below the whole BTCV CT.
MAX_VOXELS = 3_000_000
GOOD = ("ts_ct_sm", "dcmqi_3slice", "btcv_0005", "btcv_0006", "btcv_0007")
BAD = {"corrupt": "truncated", "mr": "CT model", "big": "too large"}


@dataclass
class Cohort:
    root: Path
    csv: Path
    paths: dict[str, Path]       # study id -> its input
    modality: dict[str, str]     # study id -> what the CSV declares ("" for the DICOM series: its tag says)

    def write_csv(self, path: Path, ids) -> Path:
        lines = ["id,path,modality"] + [f"{i},{self.paths[i]},{self.modality[i]}" for i in ids]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path


def _cut_liver(src: Path, labels: Path, dst: Path, slices: int) -> Path:
    image = sitk.ReadImage(str(src))
    lab = sitk.GetArrayViewFromImage(sitk.ReadImage(str(labels)))
    z = np.flatnonzero((lab == 6).any(axis=(1, 2)))  # BTCV label 6: liver
    mid = int(z.mean())
    sitk.WriteImage(image[:, :, mid - slices // 2: mid - slices // 2 + slices], str(dst))
    return dst


@pytest.fixture(scope="session")
def cohort(data_dir, tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("cohort")
    btcv = data_dir / "btcv"
    if not (btcv / "imagesTr").is_dir() or not (data_dir / "chaos_mr" / "imagesTr").is_dir():
        pytest.skip(f"BTCV or CHAOS data not found under {data_dir}")
    paths = {"ts_ct_sm": data_dir / "totalsegmentator" / "example_ct_sm.nii.gz",
             "dcmqi_3slice": data_dir / "dcmqi" / "ct-3slice"}
    for case in ("0005", "0006", "0007"):
        paths[f"btcv_{case}"] = _cut_liver(btcv / "imagesTr" / f"btcv_{case}.nii.gz",
                                           btcv / "labelsTr" / f"btcv_{case}.nii.gz", root / f"btcv_{case}.nii.gz", 8)
    whole = _cut_liver(btcv / "imagesTr" / "btcv_0009.nii.gz", btcv / "labelsTr" / "btcv_0009.nii.gz",
                       root / "btcv_0009_cut.nii.gz", 8).read_bytes()
    (root / "corrupt.nii.gz").write_bytes(whole[: len(whole) // 3])
    paths["corrupt"] = root / "corrupt.nii.gz"
    paths["mr"] = data_dir / "chaos_mr" / "imagesTr" / "chaos_t2_19.nii.gz"
    paths["big"] = btcv / "imagesTr" / "btcv_0010.nii.gz"
    modality = {k: "CT" for k in paths}
    modality["dcmqi_3slice"] = ""
    modality["mr"] = "MR"
    c = Cohort(root=root, csv=root / "studies.csv", paths=paths, modality=modality)
    c.write_csv(c.csv, list(GOOD) + list(BAD))
    return c


@pytest.fixture(scope="session")
def volume_folder(cohort, tmp_path_factory) -> Path:
    """A folder of studies: two volume files, a DICOM series subfolder (a copy) and a corrupt file."""
    folder = tmp_path_factory.mktemp("volume_folder")
    shutil.copy(cohort.paths["btcv_0005"], folder / "btcv_0005.nii.gz")
    shutil.copy(cohort.paths["corrupt"], folder / "corrupt.nii.gz")
    shutil.copytree(cohort.paths["dcmqi_3slice"], folder / "dcmqi_3slice")
    return folder
