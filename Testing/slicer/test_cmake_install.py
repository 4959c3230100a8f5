"""What the extension package installs: this project configured and installed with the real cmake.

Slicer itself is not needed: a stand-in ``SlicerConfig.cmake`` gives the variables the project
reads and the three macros it calls, each installing its files as Slicer's do
(``ctkMacroCompilePythonScript``: every SCRIPT and RESOURCE at its path relative to SOURCE_DIR
under INSTALL_DIR, with NO_INSTALL_SUBDIR no target folder; ``slicerMacroBuildScriptedModule``: the
module's scripts and resources under the scripted-modules folder). The project's own rules (which
files it lists and globs, what it filters out) are the real ones. Checked: the library is complete,
the two modality defaults ship, every other model package is left out (they come from the model
catalogue, which ships).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES_DIR = "lib/Slicer-5.12/qt-scripted-modules"

SLICER_CONFIG = f"""
set(Slicer_FOUND TRUE)
set(Slicer_USE_FILE ${{CMAKE_CURRENT_LIST_DIR}}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${{CMAKE_CURRENT_LIST_DIR}}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${{CMAKE_CURRENT_LIST_DIR}}/Empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR {MODULES_DIR})
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR {MODULES_DIR})
"""

USE_SLICER = """
include(CMakeParseArguments)
function(_stand_in_install source_dir install_dir)
  foreach(f IN LISTS ARGN)
    get_filename_component(sub "${f}" DIRECTORY)
    install(FILES "${source_dir}/${f}" DESTINATION "${install_dir}/${sub}")
  endforeach()
endfunction()
function(ctkMacroCompilePythonScript)
  cmake_parse_arguments(A "NO_INSTALL_SUBDIR" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  set(dest "${A_INSTALL_DIR}")
  if(NOT A_NO_INSTALL_SUBDIR)
    set(dest "${dest}/${A_TARGET_NAME}")
  endif()
  _stand_in_install("${A_SOURCE_DIR}" "${dest}" ${A_SCRIPTS} ${A_RESOURCES})
endfunction()
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(A "WITH_GENERIC_TESTS;WITH_SUBDIR" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  _stand_in_install("${CMAKE_CURRENT_SOURCE_DIR}" "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}" ${A_SCRIPTS} ${A_RESOURCES})
endfunction()
function(slicer_add_python_unittest)
endfunction()
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The folder the extension installs into Slicer's scripted modules, from a real cmake configure and install."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    root = tmp_path_factory.mktemp("cmake")
    fake = root / "Slicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(SLICER_CONFIG)
    (fake / "UseSlicer.cmake").write_text(USE_SLICER)
    (fake / "Empty.cmake").write_text("")
    steps = [["cmake", "-S", str(REPO), "-B", str(root / "build"), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=OFF"],
             ["cmake", "--install", str(root / "build"), "--prefix", str(root / "install")]]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode and "No CMAKE_C_COMPILER could be found" in done.stderr + done.stdout:
            pytest.skip("cmake finds no C compiler (project() enables C and C++)")
        assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return root / "install" / MODULES_DIR


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_the_library_and_the_module_are_installed(installed):
    files = _files(installed)
    library = {p.relative_to(REPO).as_posix() for p in (REPO / "MedDiffSegLib").rglob("*.py") if "__pycache__" not in p.parts}
    assert library <= files, f"library files not installed: {sorted(library - files)[:5]}"
    assert {"MedDiffSeg.py", "MedDiffSegLogicLib/models.py", "Resources/requirements.txt",
            "MedDiffSegLib/registry/catalogue.json"} <= files
    assert any(f.startswith("MedDiffSegLib/training/configs/") and f.endswith(".json") for f in files)


def test_only_the_modality_defaults_are_installed_the_other_packages_are_in_the_catalogue(installed):
    from MedDiffSegLib.modality import DEFAULT_MODELS
    from MedDiffSegLib.registry.catalogue import load_catalogue

    models = installed / "MedDiffSegLib" / "models"
    shipped = sorted(p.name for p in models.iterdir())
    assert shipped == sorted(DEFAULT_MODELS.values())
    for name in shipped:  # complete packages, byte for byte the repository's
        source = REPO / "MedDiffSegLib" / "models" / name
        assert _files(models / name) == _files(source)
        assert all((models / name / f).read_bytes() == (source / f).read_bytes() for f in _files(source))
    in_tree = {p.name for p in (REPO / "MedDiffSegLib" / "models").iterdir() if p.is_dir()}
    left_out = in_tree - set(shipped)
    assert left_out and left_out == set(load_catalogue(installed / "MedDiffSegLib" / "registry" / "catalogue.json").names())
    assert not [f for f in _files(installed) if any(f"/models/{name}/" in f for name in left_out)]
    weights = sum(p.stat().st_size for p in models.rglob("*.safetensors"))
    assert weights < 25e6, f"the shipped weights are {weights / 1e6:.1f} MB"
