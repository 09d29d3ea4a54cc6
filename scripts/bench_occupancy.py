"""Measures the occupancy step (hpcrefine.protocol.occupancy) on adk and prints the numbers.

Truth: adenylate kinase, closed (adk_closed), with --count side chains given a second conformer
(simulate.alternative_conformers: atoms beyond CB as altloc A, the model's own, and altloc B, the
most probable library rotamer with chi 1 more than 60 degrees away that clashes with nothing;
true occupancy of A drawn uniformly in 0.2-0.8, of B the rest), the side chains and occupancies
chosen with each seed of --seeds. Maps: simulated from the truth, with its occupancies, at each
resolution (noise seed = the same seed). Start: the truth with every conformer at 0.5 (and, with
--noise, every coordinate shaken by that rms, A). For each resolution it prints, per seed and over
all seeds: the mean absolute error of the A occupancies at the start and after the step, Pearson r
of refined with true, the L-BFGS iterations and the step's wall time (one process).

With --pipeline TARGET (fast or fit) the whole run instead: half maps simulated from the truth,
the start (every conformer at 0.5, coordinates shaken by --noise) written to a file, and
`hpcrefine refine START --half-maps H1 H2 --resolution R --protocol minimise,occupancy --target
TARGET` (one process); the occupancies are read back from refined.cif.

    python scripts/bench_occupancy.py [--resolutions 2.5 3 4] [--seeds 1 2 3] [--count 12]
        [--noise 0.0] [--pipeline fast|fit]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

from hpcrefine import datasets, simulate
from hpcrefine.modelio import read_model, read_structure, write_model
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.params import build_params
from hpcrefine.protocol.occupancy import ConformerGroups
from hpcrefine.protocol.param import ParamRunner
from hpcrefine.protocol.steps import run_steps
from hpcrefine.topology import build_restraints


def conformer_a(groups: ConformerGroups, occ) -> np.ndarray:
    return groups.occupancies(groups.start(occ))[groups.first[:-1]]


def make_truth(model, restraints, count: int, seed: int, workdir: str):
    """The truth with alternative conformers, read back as a run would read it."""
    st, _ = simulate.alternative_conformers(model, restraints, count, seed=seed)
    stem = os.path.join(workdir, f"truth{seed}")
    write_model(st, stem)
    return read_model(stem + ".cif"), read_structure(stem + ".cif")


def run_case(truth, st, resolution: float, seed: int, noise: float) -> dict:
    full, _, _, origin, voxel, _ = simulate.simulate_maps(st, resolution, seed=seed)
    groups = ConformerGroups.of(truth)
    true_a = conformer_a(groups, truth.occ)
    occ0 = np.where(truth.altloc != "", 0.5, truth.occ)
    xyz = simulate.shake(truth.xyz, noise, seed=seed + 100)
    inputs = types.SimpleNamespace(model=truth, map=types.SimpleNamespace(origin=origin, voxel=voxel),
                                   data=full, restraints=None)
    t0 = time.perf_counter()
    _, _, occ, records = run_steps(["occupancy"], ParamRunner(None), inputs, xyz, truth.b, None, None,
                                   build_params(resolution), occ=occ0)
    seconds = time.perf_counter() - t0
    got = conformer_a(groups, occ)
    return {"true": true_a, "got": got, "mae0": float(np.abs(0.5 - true_a).mean()),
            "mae": float(np.abs(got - true_a).mean()), "r": float(np.corrcoef(got, true_a)[0, 1]),
            "iterations": records[0]["iterations"], "seconds": seconds}


def run_pipeline(truth, st, resolution: float, seed: int, noise: float, target: str, workdir: str) -> dict:
    """The whole refinement from a file start, occupancies read back from refined.cif."""
    from hpcrefine.mapio import write_map
    from hpcrefine.modelio import updated_structure

    _, h1, h2, origin, voxel, _ = simulate.simulate_maps(st, resolution, seed=seed)
    case = os.path.join(workdir, f"run{seed}_{resolution:g}_{target}")
    os.makedirs(case, exist_ok=True)
    halves = [os.path.join(case, f"half{i}.mrc") for i in (1, 2)]
    for path, data in zip(halves, (h1, h2)):
        write_map(path, data, origin, voxel)
    occ0 = np.where(truth.altloc != "", 0.5, truth.occ)
    write_model(updated_structure(truth, simulate.shake(truth.xyz, noise, seed=seed + 100), truth.b, occ0),
                os.path.join(case, "start"))
    exe = os.path.join(os.path.dirname(sys.executable), "hpcrefine")
    t0 = time.perf_counter()
    subprocess.run([exe, "refine", os.path.join(case, "start.cif"), "--half-maps", *halves, "--resolution",
                    str(resolution), "--protocol", "minimise,occupancy", "--target", target, "--output",
                    os.path.join(case, "out")], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    refined = read_model(os.path.join(case, "out", "refined.cif"))
    groups = ConformerGroups.of(truth)
    true_a = conformer_a(groups, truth.occ)
    got = conformer_a(groups, refined.occ)
    return {"true": true_a, "got": got, "mae0": float(np.abs(0.5 - true_a).mean()),
            "mae": float(np.abs(got - true_a).mean()), "r": float(np.corrcoef(got, true_a)[0, 1]),
            "iterations": 0, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--count", type=int, default=12, help="side chains with two conformers")
    ap.add_argument("--noise", type=float, default=0.0, help="A rms shake of the start coordinates")
    ap.add_argument("--pipeline", choices=("fast", "fit"), default=None,
                    help="run the whole refinement (minimise,occupancy) with this coordinate target")
    args = ap.parse_args()

    path = datasets.fetch(["adk_closed"])["adk_closed"]
    model = read_model(path)
    restraints = build_restraints(model, MonomerLibrary())
    with tempfile.TemporaryDirectory() as workdir:
        truths = {s: make_truth(model, restraints, args.count, s, workdir) for s in args.seeds}
        print(f"adk_closed: {args.count} side chains in two conformers per seed (seeds "
              f"{', '.join(map(str, args.seeds))}), true A occupancy in 0.2-0.8, start 0.5/0.5, "
              f"coordinate noise {args.noise} A rms")
        print(f"{'map':>5} {'seed':>4} {'MAE start':>9} {'MAE':>6} {'r':>6} {'iter':>5} {'seconds':>8}")
        for res in args.resolutions:
            if args.pipeline:
                rows = {s: run_pipeline(*truths[s], res, s, args.noise, args.pipeline, workdir)
                        for s in args.seeds}
            else:
                rows = {s: run_case(*truths[s], res, s, args.noise) for s in args.seeds}
            for s, c in rows.items():
                print(f"{res:5.1f} {s:4d} {c['mae0']:9.3f} {c['mae']:6.3f} {c['r']:6.3f} "
                      f"{c['iterations']:5d} {c['seconds']:8.2f}")
            true = np.concatenate([c["true"] for c in rows.values()])
            got = np.concatenate([c["got"] for c in rows.values()])
            print(f"{res:5.1f} {'all':>4} {np.abs(0.5 - true).mean():9.3f} {np.abs(got - true).mean():6.3f} "
                  f"{np.corrcoef(got, true)[0, 1]:6.3f} {'':5} "
                  f"{np.mean([c['seconds'] for c in rows.values()]):8.2f}  (max error "
                  f"{np.abs(got - true).max():.3f}, {len(true)} residues)")


if __name__ == "__main__":
    main()
