#!/usr/bin/env python
"""NCS constraints against no NCS on copies of the 7cth dengue virus asymmetric unit.

    python scripts/bench_ncs.py [--operators 5] [--ranks 3] [--modes constraints off]
                                [--workdir DIR] [--detect-full]

The true model is the 7cth asymmetric unit (10 chains, 16,667 atoms) copied by the first
--operators operators of the file's assembly records (5: 83,335 atoms, 50 chains). Simulated 3.5 A
maps come from the true model (`hpcrefine simulate`, seed 1), the start is the true model shaken
by 0.8 A rms (`hpcrefine shake`, seed 2; independently in every copy, so the start breaks NCS).
Each mode runs `mpiexec -n RANKS hpcrefine refine start.cif --map full.mrc --resolution 3.5
--ncs MODE` in a child process; the script prints wall time, the largest rank's peak RSS, time per
target evaluation of the macro-cycles' minimisations, RMSD to the true model, and geometry, and
writes bench_ncs.json in the work directory.

--asu also refines the asymmetric unit alone (its assembly records cut to the same operators)
with --ncs constraints: the model is the master, the file's operators make the other copies
(fixed), the data term and contacts run over all of them; RMSD against the true asymmetric unit.

--detect-full also times NCS detection on the full 60-copy assembly (1,000,020 atoms, built by
scripts/bench_validate.py) and compares the operators found with the file's.

--direct START MAP times the minimiser alone in this process (no MPI, no weight trials, no
statistics): --direct-iterations L-BFGS iterations of engine.minimise (coordinates) and of
ncs.constrained_minimise (master and operators) from START against MAP at a fixed weight, and
reports seconds per target evaluation and the process's peak RSS.

--direct-asu MAP times, the same way, ncs.constrained_minimise of the 7cth asymmetric unit with
its file's first --operators assembly operators (virtual copies, operators fixed; built under
--workdir, shaken by 0.8 A rms, seed 2) against MAP (a map of the whole assembly, e.g.
bench_scale/60ops/maps/full.mrc), with the copies' data term summed over the copies directly and
from the map summed over the operators (params.ncs_average_map), and the RMSD to the true
asymmetric unit after --direct-iterations iterations.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def _asu():
    """The 7cth asymmetric unit with its entities set up, hydrogens removed."""
    import gemmi

    from hpcrefine import datasets

    st = gemmi.read_structure(datasets.fetch(["7cth"])["7cth"])
    st.setup_entities()
    st.remove_hydrogens()
    return st


def build_truth(workdir: str, n_ops: int) -> str:
    from hpcrefine import ncs

    path = os.path.join(workdir, f"truth_{n_ops}ops.cif")
    if not os.path.exists(path):
        st = _asu()
        ncs.expand_by_operators(st, n_ops).make_mmcif_document().write_file(path + ".part")
        os.replace(path + ".part", path)
    return path


def build_asu(workdir: str, n_ops: int) -> str:
    path = os.path.join(workdir, f"asu_truth_{n_ops}ops.cif")
    if not os.path.exists(path):
        st = _asu()
        gen = st.assemblies[0].generators[0]
        while len(gen.operators) > n_ops:
            gen.operators.pop()
        st.make_mmcif_document().write_file(path + ".part")
        os.replace(path + ".part", path)
    return path


def hpcrefine(*args, ranks: int = 0) -> list[str]:
    exe = [shutil.which("hpcrefine") or "hpcrefine"]
    return (["mpiexec", "-n", str(ranks)] if ranks else []) + exe + list(args)


def timed(cmd: list[str], log_path: str) -> tuple[float, float, int]:
    """Wall seconds, peak RSS of the largest process (MB, from GNU time's %M) and exit code."""
    tag = "peak-rss-kb:"
    gnu_time = shutil.which("time") or "/usr/bin/time"
    wrapped = [gnu_time, "-f", f"{tag} %M", *cmd] if os.path.exists(gnu_time) else cmd
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        rc = subprocess.run(wrapped, stdout=fh, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0
    peak = float("nan")
    with open(log_path) as fh:
        for line in fh:
            if line.startswith(tag):
                peak = float(line.split()[1]) / 1024.0
    return wall, peak, rc


def detect_full(workdir: str) -> dict:
    import gemmi

    from hpcrefine import datasets, ncs
    from hpcrefine.modelio import read_model

    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from bench_validate import build_assembly

    path = build_assembly(workdir)
    t0 = time.perf_counter()
    model = read_model(path)
    t1 = time.perf_counter()
    info = ncs.find_ncs(model)
    t2 = time.perf_counter()
    g = info.groups[0]
    asu = gemmi.read_structure(datasets.fetch(["7cth"])["7cth"])
    rot, trans = ncs.assembly_operators(asu)
    xm = model.xyz[g.master]
    worst = 0.0
    for k in range(g.n_copies):
        op = int(g.chains[k][0][1:]) - 1
        r = rot[op] @ rot[0].T
        t = trans[op] - r @ trans[0]
        d = xm @ r.T + t - (xm @ g.rot[k].T + g.trans[k])
        worst = max(worst, float(np.sqrt((d * d).sum(axis=1)).max()))
    return {"atoms": model.n_atoms, "copies": g.n_copies, "atoms_per_copy": int(g.copies.shape[1]),
            "free_atoms": int(len(info.free_atoms())), "rmsd_max": float(g.rmsd.max()),
            "max_operator_difference_A": worst, "read_seconds": round(t1 - t0, 2),
            "find_seconds": round(t2 - t1, 2)}


def _model_and_map(model_path: str, map_path: str):
    """The model, its restraints and the fast real-space target on the map, for the direct runs."""
    from hpcrefine.engine import RealSpaceTerm
    from hpcrefine.mapio import read_map
    from hpcrefine.modelio import read_model
    from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
    from hpcrefine.topology import build_restraints

    model = read_model(model_path)
    lib = MonomerLibrary(resolve_monlib_dir(None))
    lib.load(set(model.res_names.tolist()), [])
    r = build_restraints(model, lib)
    grid = read_map(map_path)
    term = RealSpaceTerm(np.asarray(grid.data, dtype=np.float32), grid.origin, grid.voxel,
                         np.ones(model.n_atoms))
    return model, r, term


def direct(start: str, map_path: str, iterations: int, weight: float = 15.0) -> dict:
    import resource

    from hpcrefine import ncs
    from hpcrefine.engine import GeometryTerm, minimise
    from hpcrefine.params import build_params

    t0 = time.perf_counter()
    model, r, term = _model_and_map(start, map_path)
    info = ncs.find_ncs(model)
    ncs.symmetrise_restraints(r, info)
    params = build_params(3.5)
    out = {"atoms": model.n_atoms, "copies": info.groups[0].n_copies, "setup_seconds": round(time.perf_counter() - t0, 1)}
    res = minimise(model.xyz, term, GeometryTerm(r, params), weight, iterations, params)
    out["off"] = {"evaluations": res.evaluations, "seconds": round(res.seconds, 2),
                  "seconds_per_evaluation": round(res.seconds / res.evaluations, 4)}
    res, target = ncs.constrained_minimise(info, model.xyz, term, r, weight, iterations, params)
    out["constraints"] = {"evaluations": res.evaluations, "seconds": round(res.seconds, 2),
                          "seconds_per_evaluation": round(res.seconds / res.evaluations, 4),
                          "parameters": target.par.size}
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return out


def direct_asu(workdir: str, n_ops: int, map_path: str, iterations: int, weight: float = 15.0) -> dict:
    import resource

    from hpcrefine import ncs, simulate
    from hpcrefine.params import build_params

    model, r, term = _model_and_map(build_asu(workdir, n_ops), map_path)
    start = simulate.shake(model.xyz, 0.8, seed=2)
    info = ncs.assembly_ncs(model)
    out = {"atoms": model.n_atoms, "copies": info.groups[0].n_copies,
           "rmsd_start": round(float(np.sqrt(np.mean(np.sum((start - model.xyz) ** 2, axis=1)))), 4)}
    for name, average in (("direct", False), ("summed map", True)):
        params = build_params(3.5, overrides={"ncs_average_map": average})
        t0 = time.perf_counter()
        res, target = ncs.constrained_minimise(info, start, term, r, weight, iterations, params)
        out[name] = {"evaluations": res.evaluations, "seconds": round(res.seconds, 2),
                     "seconds_per_evaluation": round(res.seconds / res.evaluations, 4),
                     "wall_with_setup": round(time.perf_counter() - t0, 2),
                     "rmsd": round(float(np.sqrt(np.mean(np.sum((res.xyz - model.xyz) ** 2, axis=1)))), 4)}
        print(name, json.dumps(out[name]), flush=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--operators", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--modes", nargs="+", default=["constraints", "off"])
    ap.add_argument("--resolution", type=float, default=3.5)
    ap.add_argument("--workdir", default=os.path.join(os.environ.get("HPCREFINE_DATA")
                                                      or os.path.expanduser("~/.cache/hpcrefine"), "bench_ncs"))
    ap.add_argument("--detect-full", action="store_true")
    ap.add_argument("--asu", action="store_true")
    ap.add_argument("--direct", nargs=2, metavar=("START", "MAP"))
    ap.add_argument("--direct-asu", metavar="MAP")
    ap.add_argument("--direct-iterations", type=int, default=20)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="further arguments for hpcrefine refine")
    args = ap.parse_args(argv)
    from hpcrefine.compare import rmsd

    if args.direct:
        res = direct(*args.direct, args.direct_iterations)
        print(json.dumps(res))
        return 0
    if args.direct_asu:
        os.makedirs(args.workdir, exist_ok=True)
        print(json.dumps(direct_asu(args.workdir, args.operators, args.direct_asu, args.direct_iterations)))
        return 0

    work = os.path.join(args.workdir, f"{args.operators}ops")
    os.makedirs(work, exist_ok=True)
    results = {"operators": args.operators, "ranks": args.ranks, "runs": {}}
    if args.detect_full:
        results["detect_full"] = detect_full(args.workdir)
        print("60-copy assembly:", json.dumps(results["detect_full"]))
    truth = build_truth(args.workdir, args.operators)
    maps = os.path.join(work, "maps")
    if not os.path.exists(os.path.join(maps, "full.mrc")):
        subprocess.run(hpcrefine("simulate", truth, "--resolution", str(args.resolution), "--output", maps,
                                 "--seed", "1", "--overwrite"), check=True, stdout=subprocess.DEVNULL)
    start = os.path.join(work, "start.cif")
    if not os.path.exists(start):
        subprocess.run(hpcrefine("shake", truth, "--rms", "0.8", "--seed", "2", "--output", start),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results["start_rmsd"] = rmsd(start, truth)
    print(f"truth {truth}: {results['start_rmsd']['model_atoms']} atoms; start RMSD "
          f"{results['start_rmsd']['rmsd_all']:.3f} A")
    runs = [(mode, start, truth) for mode in args.modes]
    if args.asu:
        asu_truth = build_asu(args.workdir, args.operators)
        asu_start = os.path.join(work, "asu_start.cif")
        if not os.path.exists(asu_start):
            subprocess.run(hpcrefine("shake", asu_truth, "--rms", "0.8", "--seed", "2", "--output", asu_start),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runs.append(("asu_constraints", asu_start, asu_truth))
    for label, start, truth in runs:
        mode = "constraints" if label == "asu_constraints" else label
        out = os.path.join(work, f"run_{label}")
        cmd = hpcrefine("refine", start, "--map", os.path.join(maps, "full.mrc"), "--resolution",
                        str(args.resolution), "--output", out, "--overwrite", "--ncs", mode, *args.extra,
                        ranks=args.ranks)
        wall, peak, rc = timed(cmd, os.path.join(work, f"run_{label}.log"))
        if rc != 0:
            print(f"{label}: exit code {rc}, see {work}/run_{label}.log")
            results["runs"][label] = {"exit_code": rc}
            continue
        with open(os.path.join(out, "report.json")) as fh:
            rep = json.load(fh)
        evals = sum(c["evaluations"] for c in rep["cycles"])
        secs = sum(c["seconds"] for c in rep["cycles"])
        r = rmsd(os.path.join(out, "refined.cif"), truth)
        after = rep["after"]
        results["runs"][label] = {
            "wall_seconds": round(wall, 1), "peak_rss_mb_largest_rank": round(peak),
            "macro_cycle_minimisations": {"evaluations": evals, "seconds": round(secs, 2),
                                          "seconds_per_evaluation": round(secs / max(evals, 1), 4)},
            "timings": rep["timings"], "rmsd_all": round(r["rmsd_all"], 4), "rmsd_ca": round(r["rmsd_ca"], 4),
            "bond_rmsd": after["bond_rmsd"], "angle_rmsd": after["angle_rmsd"], "clashes": after["clashes"],
            "cc_mask": after.get("cc_mask"), "weight": rep["weight"], "ncs": rep.get("ncs", {}).get("reason")}
        print(f"{label}: wall {wall:.1f} s, peak RSS {peak:.0f} MB, {secs / max(evals, 1) * 1000:.1f} ms per "
              f"evaluation ({evals} evaluations in {secs:.1f} s), RMSD {r['rmsd_all']:.3f} A (CA "
              f"{r['rmsd_ca']:.3f}), bonds {after['bond_rmsd']:.4f} A, angles {after['angle_rmsd']:.2f} deg, "
              f"clashes {after['clashes']}, CC_mask {after.get('cc_mask')}")
    with open(os.path.join(work, "bench_ncs.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print(f"wrote {os.path.join(work, 'bench_ncs.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
