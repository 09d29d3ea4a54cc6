#!/usr/bin/env python
"""Bytes a worker exchanges per evaluation, boxes with halos against blocks with the whole model
gathered, across model sizes.

    mpiexec -n P python scripts/bench_halo.py [--operators 1 3 6 18] [--evaluations 20]
                                              [--workdir DIR]

Every rank is a worker (no master). For each model, the first --operators copies of the 7cth
dengue asymmetric unit (16,667 atoms per copy; scripts/bench_ncs.py build_truth, cached under
--workdir, default $HPCREFINE_DATA or ~/.cache/hpcrefine, then bench_ncs) and adenylate kinase
(3,341 atoms), shaken by 0.8 A (seed 2): the distributed target of the coordinate minimisation
(parallel.distributed.distributed_target) is made twice, with params.decomposition "boxes" (each
rank owns a compact region of whole residues and exchanges halos: parallel.halo) and "blocks"
(runs of residues in file order; an Allgatherv of the coordinates and a Reduce_scatter of the
gradient at every evaluation), and called --evaluations times in the optimiser's form
(owned_call) at the start moved by 0.01 A rms, so the halo lists stay valid.

The data term is the fast real-space target on a map of zeros over the model's box at 1.2 A
pixels: it reads only each rank's own atoms in both forms and does not change what is exchanged;
the restraints and non-bonded terms are the real ones.

Printed per model: atoms, the atoms a rank owns, its halo (atoms owned by others that its terms
read: bonded partners and every atom within the neighbour search radius + 2 A), the bytes it
sends per evaluation with boxes and with blocks, and the seconds per evaluation in the exchange
and in its own terms (on an oversubscribed machine the seconds are only indicative).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np
from mpi4py import MPI

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

WEIGHT = 10.0


def model_path(name: str, workdir: str) -> str:
    from hpcrefine import datasets
    if name == "adk":
        return datasets.fetch(["adk_closed"])["adk_closed"]
    from bench_ncs import build_truth
    return build_truth(workdir, int(name))


def measure(comm, path: str, evaluations: int) -> dict:
    from hpcrefine import simulate
    from hpcrefine.engine import RealSpaceTerm
    from hpcrefine.modelio import read_model
    from hpcrefine.monlib import MonomerLibrary
    from hpcrefine.params import RefineParams
    from hpcrefine.parallel.distributed import distributed_target
    from hpcrefine.topology import build_restraints

    model = read_model(path)
    r = build_restraints(model, MonomerLibrary())
    xyz0 = simulate.shake(model.xyz, 0.8, seed=2)
    lo = xyz0.min(axis=0) - 5.0
    shape = tuple(int(v) for v in np.ceil((xyz0.max(axis=0) + 5.0 - lo) / 1.2)[::-1])
    term = RealSpaceTerm(np.zeros(shape, dtype=np.float32), lo, np.full(3, 1.2), np.ones(model.n_atoms),
                         normalise=False)
    rng = np.random.default_rng(3)
    moves = [xyz0 + rng.normal(scale=0.01 / np.sqrt(3), size=xyz0.shape) for _ in range(evaluations)]
    out = {"atoms": model.n_atoms}
    for form in ("boxes", "blocks"):
        params = dataclasses.replace(RefineParams(resolution=3.5), decomposition=form)
        target = distributed_target(comm, xyz0, term, r, model.res_first_atom, WEIGHT, params, boxes=True)
        target.owned_call(target.own_part(xyz0))       # the neighbour list is built here: not timed
        local0, reduce0, evals0 = target.seconds_local, target.seconds_reduce, target.n_evals
        comm.Barrier()
        t0 = time.perf_counter()
        for x in moves:
            target.owned_call(target.own_part(x))
        wall = (time.perf_counter() - t0) / evaluations
        evals = target.n_evals - evals0
        n = model.n_atoms
        sent = (target.halo.bytes_per_evaluation() if target.halo is not None
                else 2 * 8 * (3 * n + 1) * (comm.Get_size() - 1) // comm.Get_size() + 8)
        row = np.array([target.n_owned, len(target.halo.need) if target.halo is not None else n - target.n_owned,
                        sent, (target.seconds_reduce - reduce0) / evals, (target.seconds_local - local0) / evals,
                        wall, target.halo.n_builds if target.halo is not None else 0], dtype=np.float64)
        rows = np.empty((comm.Get_size(), len(row))) if comm.Get_rank() == 0 else None
        comm.Gather(row, rows, root=0)
        out[form] = rows
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--operators", type=str, nargs="+", default=["adk", "1", "3", "6"])
    ap.add_argument("--evaluations", type=int, default=20)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    comm = MPI.COMM_WORLD
    base = args.workdir or os.environ.get("HPCREFINE_DATA") or os.path.expanduser("~/.cache/hpcrefine")
    workdir = os.path.join(base, "bench_ncs")
    os.makedirs(workdir, exist_ok=True)
    p = comm.Get_size()
    if comm.Get_rank() == 0:
        print(f"{p} ranks, each a worker; per rank: owned atoms, halo atoms, bytes sent per evaluation, "
              "exchange and own-terms ms per evaluation (max over ranks)")
        print(f"{'model':>6} {'atoms':>9} {'owned':>8} {'halo boxes':>10} {'halo/owned^2/3':>14} "
              f"{'bytes boxes':>11} {'bytes blocks':>12} {'ratio':>6} {'exch ms b/k':>12} {'own ms b/k':>12}")
    for name in args.operators:
        path = model_path(name, workdir) if comm.Get_rank() == 0 else None
        path = comm.bcast(path, root=0)
        res = measure(comm, path, args.evaluations)
        if comm.Get_rank() == 0:
            b, k = res["boxes"], res["blocks"]
            owned = b[:, 0].mean()
            halo = b[:, 1].max()
            print(f"{name:>6} {res['atoms']:9,d} {owned:8,.0f} {halo:10,.0f} {halo / owned ** (2 / 3):14.1f} "
                  f"{b[:, 2].max():11,.0f} {k[:, 2].max():12,.0f} {k[:, 2].max() / b[:, 2].max():6.1f} "
                  f"{1e3 * b[:, 3].max():5.1f}/{1e3 * k[:, 3].max():<6.1f} "
                  f"{1e3 * b[:, 4].max():5.1f}/{1e3 * k[:, 4].max():<6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
