#!/usr/bin/env bash
# The demo: install hpcrefine, fetch the real adenylate kinase model (1AKE, closed form), simulate
# 3.5 A full and half maps from it, shake the model by 0.8 A rms (a poor start with bad geometry),
# refine the shaken model under mpiexec and print the before/after figures and the RMSD to truth.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${HPCREFINE_VENV:-.venv}
OUT=${HPCREFINE_DEMO_DIR:-demo}
NP=${HPCREFINE_DEMO_RANKS:-3}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
export PATH="$(cd "$VENV" && pwd)/bin:$PATH"     # HPCREFINE_VENV relative or absolute
TRUTH=$(hpcrefine data path adk_closed | cut -f2)
mkdir -p "$OUT"
[ -f "$OUT/maps/half1.mrc" ] || hpcrefine simulate "$TRUTH" --resolution 3.5 --seed 1 --output "$OUT/maps"
hpcrefine shake "$TRUTH" --rms 0.8 --seed 2 --output "$OUT/start.cif"
mpiexec -n "$NP" hpcrefine refine "$OUT/start.cif" --half-maps "$OUT/maps/half1.mrc" "$OUT/maps/half2.mrc" \
  --resolution 3.5 --output "$OUT/refined" --overwrite
echo "RMSD to the true model, before and after:"
hpcrefine rmsd "$OUT/start.cif" "$TRUTH"
hpcrefine rmsd "$OUT/refined/refined.cif" "$TRUTH"
