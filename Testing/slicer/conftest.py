"""Fixtures for the Slicer module's tests on real MRML (slicer-core); see slicer_harness.py.

Every test in this folder that needs ``slicer`` uses the ``slicer`` / ``mrml`` / ``module``
fixtures, which skip with a clear reason when slicer-core is not installed
(``pip install slicer-core==5.12.4.0``; CI installs it via .ci/install.d/30-slicer.sh).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.register_assert_rewrite("slicer_harness")
import slicer_harness  # noqa: E402

# MedDiffSegLogicLib (beside the module file) imports without slicer; its pure parts are tested anyway.
if str(slicer_harness.MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(slicer_harness.MODULE_DIR))

SKIP_REASON = ("slicer-core is not installed (`import slicer` unavailable): "
               "pip install slicer-core==5.12.4.0 - never the unrelated PyPI package 'slicer'")


@pytest.fixture(scope="session")
def slicer():
    module = slicer_harness.import_slicer()
    if module is None:
        pytest.skip(SKIP_REASON)
    slicer_harness.install_standins(module)
    return module


@pytest.fixture
def mrml(slicer):
    """A fresh scene with the application, colour, volumes and segmentations logics, made current."""
    env = slicer_harness.MRMLEnvironment(slicer).activate()
    yield env
    env.scene.Clear(1)


@pytest.fixture(scope="session")
def module(slicer):
    """The scripted module file ``MedDiffSeg/MedDiffSeg.py``, imported with the Qt stand-ins."""
    return slicer_harness.load_module(slicer)


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory):
    """Tiny random-weight model: 32x32 windows at 12 mm, so one window per slice of the example CT."""
    from tinymodels import make_tiny_package

    return make_tiny_package(tmp_path_factory.mktemp("slicer_tiny") / "tiny-guided", "guided",
                             spacing=(12.0, 12.0), steps=1, samples=2)

ORGANS, SEED, SAMPLES = slicer_harness.ORGANS, slicer_harness.SEED, slicer_harness.SAMPLES


@pytest.fixture(scope="session")
def library_ct(data_dir, tiny_package):
    """``segment_volume`` run directly on the example CT file: the reference for what the module shows."""
    import SimpleITK as sitk

    from MedDiffSegLib.inference import segment_volume

    image = sitk.ReadImage(str(data_dir / "totalsegmentator" / "example_ct.nii.gz"))
    return segment_volume(image, tiny_package, ORGANS, samples=SAMPLES, seed=SEED, device="cpu")


@pytest.fixture
def ct_node(mrml, slicer, data_dir):
    """The real example CT in the current scene, loaded through a storage node."""
    return slicer_harness.load_through_storage_node(slicer, mrml.scene, data_dir / "totalsegmentator" / "example_ct.nii.gz", "example_ct")
