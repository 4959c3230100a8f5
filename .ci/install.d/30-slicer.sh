# 3D Slicer's MRML without the desktop app, for the Slicer module's tests (Testing/slicer):
#   slicer-core (PyPI, about 1 GB with its VTK wheel) -> `import slicer` with MRML, the
#   Volumes/Segmentations/Colors logics and storage nodes. NOT the unrelated PyPI package "slicer".
# Sourced by .ci/run inside the venv. Idempotent: nothing is downloaded when the pinned version
# is already installed. A failed install is fatal on purpose (the tests would otherwise skip).

_slicer_core_version="5.12.4.0"
if python -c "import importlib.metadata as m, sys; sys.exit(m.version('slicer-core') != '$_slicer_core_version')" >/dev/null 2>&1; then
  :
else
  echo "CI: pip install slicer-core==$_slicer_core_version"
  python -m pip install --quiet --retries 10 --timeout 120 "slicer-core==$_slicer_core_version"
fi
unset _slicer_core_version
