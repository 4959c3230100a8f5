# DICOM tools for the tests of MedDiffSegLib/dicom (sourced by .ci/run inside the venv):
#   dicom3tools  -> dciodvfy, the DICOM IOD validator the SEG/Parametric Map tests run
#   orthanc      -> a real PACS the C-STORE tests start on localhost (random ports, temp storage)
#   dcmqi (PyPI) -> segimage2itkimage, an independent DICOM-SEG reader for the round-trip tests
# Idempotent and quick: nothing is downloaded (no apt-get update) when everything is already
# installed. Without root (and without sudo) the system packages are skipped with a warning;
# the tests that need them then skip and say why.

_dicom_have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }

_dicom_missing_pkgs=()
_dicom_have dciodvfy || _dicom_missing_pkgs+=(dicom3tools)
_dicom_have Orthanc || _dicom_missing_pkgs+=(orthanc)
if [ "${#_dicom_missing_pkgs[@]}" -gt 0 ]; then
  _dicom_sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then _dicom_sudo="sudo -n"; else _dicom_sudo="none"; fi
  fi
  if [ "$_dicom_sudo" = "none" ]; then
    echo "CI: warning: not root and no sudo: not installing ${_dicom_missing_pkgs[*]} (their tests will skip)" >&2
  else
    echo "CI: apt-get install ${_dicom_missing_pkgs[*]}"
    $_dicom_sudo apt-get update -qq
    # The orthanc package would start a system service; the tests start their own instance.
    # Keep it from starting (Debian's policy-rc.d convention) unless a policy is already there.
    _dicom_policy_added=""
    if [ ! -e /usr/sbin/policy-rc.d ] && [ -z "$_dicom_sudo" ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
      _dicom_policy_added=1
    fi
    DEBIAN_FRONTEND=noninteractive $_dicom_sudo apt-get install -y -qq --no-install-recommends \
      "${_dicom_missing_pkgs[@]}" >/dev/null
    if [ -n "$_dicom_policy_added" ]; then rm -f /usr/sbin/policy-rc.d; fi
    unset _dicom_policy_added
  fi
  unset _dicom_sudo
fi
unset _dicom_missing_pkgs
unset -f _dicom_have

if ! command -v segimage2itkimage >/dev/null 2>&1; then
  echo "CI: pip install dcmqi"
  python -m pip install --quiet "dcmqi>=1.3,<2"
fi
