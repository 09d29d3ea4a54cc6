#!/usr/bin/env python
"""Benchmark: the neighbour list refreshed around the atoms that moved far, against rebuilding the
whole list whenever any pair may have come into contact.

One process minimises a model (by default the 100,002-atom, 6-operator dengue assembly of
scripts/bench_scale.py, its 0.8 A shaken start and simulated 3.5 A map) with the fast real-space
target and every restraint for `--iterations` L-BFGS iterations, twice: with the list refreshed
(core.nonbonded.NeighbourList.refresh: only the movers' pairs searched again) and with
`full_fraction = 0` (every update a whole build, as before). Prints per mode: evaluations, list
updates (whole builds / around the movers), seconds spent keeping the list, seconds in all, and
whether the two final models are bitwise the same (they must be: pairs beyond contact add nothing
and the list stays sorted).

    python scripts/bench_neighbours.py [--model START.cif --map MAP.mrc] [--iterations 40]
        [--max-step 0.5]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcrefine.core import nonbonded  # noqa: E402
from hpcrefine.engine import GeometryTerm, RealSpaceTerm, initial_weight, minimise  # noqa: E402
from hpcrefine.mapio import read_map  # noqa: E402
from hpcrefine.modelio import read_model  # noqa: E402
from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir  # noqa: E402
from hpcrefine.params import build_params  # noqa: E402
from hpcrefine.topology import build_restraints  # noqa: E402

SCALE = Path.home() / ".cache" / "hpcrefine" / "bench_scale" / "6ops"


class TimedList(nonbonded.NeighbourList):
    """A NeighbourList that adds up the seconds its updates take."""
    seconds = 0.0

    def update(self, xyz) -> None:
        t0 = time.perf_counter()
        super().update(xyz)
        TimedList.seconds += time.perf_counter() - t0

    def refresh(self, xyz) -> bool:
        t0 = time.perf_counter()
        changed = super().refresh(xyz)
        TimedList.seconds += time.perf_counter() - t0
        return changed


def run(xyz0, term, restraints, params, iterations: int, full_fraction: float) -> dict:
    TimedList.full_fraction = full_fraction
    TimedList.seconds = 0.0
    geom = GeometryTerm(restraints, params)
    w = initial_weight(xyz0, term, geom)
    t0 = time.perf_counter()
    res = minimise(xyz0, term, geom, w, iterations, params)
    return {"seconds": time.perf_counter() - t0, "evaluations": res.evaluations,
            "builds": geom.nbl.n_builds, "partial": geom.nbl.n_partial,
            "seconds_list": TimedList.seconds, "xyz": res.xyz}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(SCALE / "start_0.8.cif"))
    ap.add_argument("--map", default=str(SCALE / "maps" / "full.mrc"))
    ap.add_argument("--resolution", type=float, default=3.5)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--max-step", type=float, default=0.5)
    a = ap.parse_args(argv)
    for path in (a.model, a.map):
        if not Path(path).exists():
            sys.exit(f"{path} not found: run scripts/bench_scale.py --operators 6 first, or give "
                     "--model and --map")
    nonbonded.NeighbourList = TimedList     # what engine.GeometryTerm builds
    model = read_model(a.model)
    grid = read_map(a.map)
    restraints = build_restraints(model, MonomerLibrary(resolve_monlib_dir(None)))
    params = build_params(a.resolution, overrides={"max_step": a.max_step})
    term = RealSpaceTerm(np.asarray(grid.data, dtype=np.float32), grid.origin, grid.voxel,
                         np.ones(model.n_atoms))
    # compile the list's kernels (numba, cached on disk) before anything is timed
    warm = nonbonded.NeighbourList(model.xyz[:2000], restraints=None, vdw_radius=restraints.vdw_radius[:2000])
    warm.refresh(model.xyz[:2000] + np.array([0.0, 0.0, 2.0]) * (np.arange(2000) % 50 == 0)[:, None])
    print(f"{model.n_atoms} atoms, {a.iterations} iterations, max_step {a.max_step} A")
    print(f"{'neighbour list':<28} {'evals':>6} {'whole builds':>13} {'around movers':>14} "
          f"{'list (s)':>9} {'all (s)':>8}")
    out = {}
    for name, frac in (("refreshed around movers", nonbonded.NeighbourList.full_fraction),
                       ("whole rebuilds", 0.0)):
        r = out[name] = run(model.xyz, term, restraints, params, a.iterations, frac)
        print(f"{name:<28} {r['evaluations']:>6} {r['builds']:>13} {r['partial']:>14} "
              f"{r['seconds_list']:>9.2f} {r['seconds']:>8.2f}")
    a_, b_ = out.values()
    print("final models bitwise identical:", bool(np.array_equal(a_["xyz"], b_["xyz"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
