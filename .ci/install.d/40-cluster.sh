# Ray, the optional engine of `meddiffseg batch` (the 'cluster' extra of pyproject.toml), so that
# the batch tests on a local Ray cluster (Testing/cohort) run in CI instead of skipping.
# Sourced by .ci/run inside the venv. Idempotent: nothing is downloaded when a Ray the extra accepts
# is already installed. A failed install is fatal on purpose (the tests would otherwise skip).

if python -c "import importlib.metadata as m, sys; v = tuple(int(x) for x in m.version('ray').split('.')[:2]); sys.exit(not (2, 10) <= v < (3, 0))" >/dev/null 2>&1; then
  :
else
  echo "CI: pip install -e .[cluster] (ray)"
  python -m pip install --quiet --retries 10 --timeout 120 -e ".[cluster]"
fi
