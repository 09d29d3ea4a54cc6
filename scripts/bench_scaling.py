#!/usr/bin/env python
"""Benchmark: strong scaling of one half set's target + gradient evaluation on the 165,175-atom
ribosome (6zu5), and the master's CPU use while it waits.

    python scripts/bench_scaling.py --workdir /tmp/bench_scaling [--workers 1 2] [--iterations 20]

Prepares (once, cached in the workdir) simulated 3.5 A maps of 6zu5 and a start shaken by 0.8 A,
then for each worker count W runs `mpiexec -n W+1` of this script in --measure mode: rank 0 is the
master (it waits quietly, as in a refinement), ranks 1..W form one half set that shares an L-BFGS
minimisation of `--iterations` iterations against half map 1 (distributed_minimise: the
optimiser split between the workers, an Allgatherv of the coordinates and a Reduce_scatter of
3n gradient values per evaluation). It prints, per W: seconds per evaluation (wall, and the
part spent in each rank's own terms and in the Allreduce), the speed-up over one worker, the
master's CPU time as a fraction of the wall time, and the bytes each rank sends per evaluation.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prepare(work: Path) -> dict:
    from hpcrefine import datasets, simulate
    from hpcrefine.modelio import read_model, updated_structure, write_model

    truth = datasets.fetch(["6zu5"])["6zu5"]
    maps = work / "maps"
    if not (maps / "half1.mrc").exists():
        t0 = time.perf_counter()
        simulate.write_simulated(truth, 3.5, str(maps), seed=1)
        print(f"simulated 3.5 A maps of 6zu5 in {time.perf_counter() - t0:.0f} s", flush=True)
    start = work / "start.cif"
    if not start.exists():
        model = read_model(truth)
        write_model(updated_structure(model, simulate.shake(model.xyz, 0.8, seed=2)), str(work / "start"))
    return {"start": str(start), "half1": str(maps / "half1.mrc"), "half2": str(maps / "half2.mrc")}


def measure(args) -> None:
    """Run under mpiexec: rank 0 waits like a master, the other ranks share one minimisation."""
    from mpi4py import MPI

    from hpcrefine.engine import GeometryTerm, RealSpaceTerm, initial_weight
    from hpcrefine.halfset import half_term
    from hpcrefine.params import build_params
    from hpcrefine.parallel.context import make_context
    from hpcrefine.parallel.distributed import distributed_minimise, master_wait_for, notify_master
    from hpcrefine.refine import load_inputs

    world = MPI.COMM_WORLD
    ctx = make_context(world)
    params = build_params(3.5)
    t0 = time.perf_counter()
    inputs = load_inputs(args.start, None, [args.half1, args.half2], None, [], need_map=True)
    g = inputs.map
    model = inputs.model
    w = None
    if ctx.is_worker:
        term = half_term(inputs.half_maps[0].data, g.origin, g.voxel, 3.5, [1.0] * model.n_atoms)
        geom = GeometryTerm(inputs.restraints, params)
        w = initial_weight(model.xyz, RealSpaceTerm(inputs.data, g.origin, g.voxel, term.atom_weight), geom)
    t_setup = time.perf_counter() - t0
    world.Barrier()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    out = None
    if ctx.is_worker:
        # a short warm-up compiles the kernels, then the measured minimisation
        distributed_minimise(ctx.workers, model.xyz, term, inputs.restraints, model.res_first_atom, w, 2, params)
        t1 = time.perf_counter()
        res, target = distributed_minimise(ctx.workers, model.xyz, term, inputs.restraints,
                                           model.res_first_atom, w, args.iterations, params)
        wall = time.perf_counter() - t1
        out = {"rank": ctx.rank, "evaluations": res.evaluations, "wall": wall,
               "local": target.seconds_local, "reduce": target.seconds_reduce,
               "nbl_builds": target.n_nbl_builds}
        notify_master(world)
    else:
        master_wait_for(world)
    master = {"cpu": time.process_time() - cpu0, "wall": time.perf_counter() - wall0}
    rows = world.gather(out if ctx.is_worker else master, root=0)
    if ctx.is_master:
        workers = rows[1:]
        ev = workers[0]["evaluations"]
        print("RESULT " + json.dumps({
            "workers": len(workers), "atoms": model.n_atoms, "evaluations": ev,
            "seconds_per_eval": max(r["wall"] for r in workers) / ev,
            "local_per_eval": [round(r["local"] / ev, 4) for r in workers],
            "reduce_per_eval": [round(r["reduce"] / ev, 4) for r in workers],
            "nbl_builds": workers[0]["nbl_builds"],
            "master_cpu_s": round(master["cpu"], 3), "master_wall_s": round(master["wall"], 2),
            "master_cpu_fraction": master["cpu"] / master["wall"],
            "bytes_per_eval_per_rank": 8 * (3 * model.n_atoms + 1),
            "setup_s": round(t_setup, 1)}), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_scaling")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", help=argparse.SUPPRESS)
    ap.add_argument("--half1", help=argparse.SUPPRESS)
    ap.add_argument("--half2", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        measure(args)
        return 0
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    case = prepare(work)
    mpiexec = Path(sys.executable).parent / "mpiexec"
    results = []
    for w in args.workers:
        cmd = [str(mpiexec), "-n", str(w + 1), sys.executable, os.path.abspath(__file__), "--measure",
               "--iterations", str(args.iterations), "--start", case["start"], "--half1", case["half1"],
               "--half2", case["half2"]]
        env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            print(p.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULT "))[7:])
        results.append(row)
    base = results[0]["seconds_per_eval"]
    print(f"6zu5: {results[0]['atoms']} atoms, {args.iterations} L-BFGS iterations of one half set")
    print(f"{'workers':>7} {'s/eval':>8} {'speed-up':>8} {'local s/eval (per rank)':>26} "
          f"{'Allreduce s/eval':>18} {'master CPU/wall':>16} {'MB sent/eval/rank':>18}")
    for r in results:
        print(f"{r['workers']:>7} {r['seconds_per_eval']:8.4f} {base / r['seconds_per_eval']:8.2f} "
              f"{str(r['local_per_eval']):>26} {str(r['reduce_per_eval']):>18} "
              f"{100 * r['master_cpu_fraction']:15.2f}% {r['bytes_per_eval_per_rank'] / 1e6:18.2f}")
    (work / "bench_scaling.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
