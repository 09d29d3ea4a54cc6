#!/usr/bin/env bash
# Install hpcrefine with its test dependencies into a virtual environment and run the whole test
# suite: the numerical core, I/O, restraints, and end-to-end refinements on real models.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCREFINE_VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e ".[test]"
# The reference copy of the CCP4 monomer library the bundled one is tested against (Debian package).
if [ ! -d "${HPCREFINE_REFMAC_DICT:-/usr/share/refmac/monomers}" ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq refmac-dictionary >/dev/null
fi
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"     # HPCREFINE_VENV relative or absolute
"$VENV/bin/python" -m pytest -q -ra tests "$@"
