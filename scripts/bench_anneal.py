"""Measures the anneal and idealise protocol steps on adk closed (1AKE) in simulated maps.

For each resolution (default 4 and 6 A, maps simulated with seed 1) and each start:
  shake    every atom displaced at random, 1.5 A rms (hpcrefine.simulate.shake, seed 3): bad
           geometry and small local errors everywhere
  rotamer  the true model with the side chain beyond CB of every third residue turned by 120
           degrees about CA-CB (wrong rotamers with ideal geometry: barriers a minimiser does not cross)
the protocols minimise, anneal,minimise and idealise,minimise run as `hpcrefine refine` (default
parameters of the resolution otherwise), and the script prints all-atom and C-alpha RMSD to the
true model (in place), bond and angle rmsd, Ramachandran outliers, clashes and wall time.

    python scripts/bench_anneal.py [--resolutions 4 6] [--starts shake rotamer]
        [--protocols minimise anneal,minimise idealise,minimise] [--ranks K] [--params FILE]
        [--workdir DIR] [--json FILE]

With --ranks K > 1 the refinements run under mpiexec -n K; --params passes a TOML file of
parameters (anneal_*, idealise_*) to every run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from hpcrefine import datasets
from hpcrefine.modelio import read_model, updated_structure, write_model
from hpcrefine.protocol.rigid import rotation
from hpcrefine.simulate import shake, write_simulated

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_protocol import refine  # noqa: E402  (one runner of `hpcrefine refine` for the benchmarks)


def turn_side_chains(model, every: int = 3, degrees: float = 120.0) -> np.ndarray:
    """The side-chain atoms beyond CB of every `every`-th residue turned about CA-CB."""
    xyz = model.xyz.copy()
    first = model.res_first_atom
    for r in range(0, model.n_residues, every):
        idx = np.arange(first[r], first[r + 1])
        names = model.atom_name[idx]
        if "CB" not in names or "CA" not in names:
            continue
        side = idx[~np.isin(names, ["N", "CA", "C", "O", "CB", "OXT"])]
        if len(side) == 0:
            continue
        ca, cb = xyz[idx[names == "CA"][0]], xyz[idx[names == "CB"][0]]
        axis = (cb - ca) / np.linalg.norm(cb - ca)
        xyz[side] = (xyz[side] - cb) @ rotation(np.radians(degrees) * axis).T + cb
    return xyz


def rmsd(a, b, sel=None) -> float:
    d2 = np.sum((a - b) ** 2, axis=1)
    return float(np.sqrt(np.mean(d2 if sel is None else d2[sel])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=float, nargs="+", default=[4.0, 6.0])
    ap.add_argument("--starts", nargs="+", choices=["shake", "rotamer"], default=["shake", "rotamer"])
    ap.add_argument("--protocols", nargs="+", default=["minimise", "anneal,minimise", "idealise,minimise"])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--params", help="TOML parameter file for every run")
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", help="write the numbers to this file")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_anneal_"))
    work.mkdir(parents=True, exist_ok=True)
    truth_path = datasets.fetch(["adk_closed"])["adk_closed"]
    truth = read_model(truth_path)
    ca = truth.atom_name == "CA"
    starts = {"shake": shake(truth.xyz, 1.5, seed=3), "rotamer": turn_side_chains(truth)}
    rows = []
    print(f"adk closed, {truth.n_atoms} atoms; {args.ranks} rank(s)"
          + (f"; parameters {args.params}" if args.params else ""))
    print(f"{'map':>5s} {'start':8s} {'protocol':22s} {'RMSD':>6s} {'CA':>6s} {'bonds':>7s} {'angles':>6s}"
          f" {'rama out':>8s} {'clashes':>7s} {'seconds':>7s}")
    for res in args.resolutions:
        maps = work / f"maps_{res:g}A"
        write_simulated(truth_path, res, str(maps), seed=1, overwrite=True)
        for start_name in args.starts:
            start = work / f"start_{start_name}"
            write_model(updated_structure(truth, starts[start_name]), str(start))
            s = starts[start_name]
            print(f"{res:4.1f}A {start_name:8s} {'(start)':22s} {rmsd(s, truth.xyz):6.3f} "
                  f"{rmsd(s, truth.xyz, ca):6.3f}")
            for protocol in args.protocols:
                run = work / f"run_{res:g}_{start_name}_{protocol.replace(',', '-')}"
                extra = ["--params", args.params] if args.params else []
                seconds = refine([f"{start}.cif", "--map", str(maps / "full.mrc"), "--resolution", f"{res:g}",
                                  "--protocol", protocol, "--output", str(run), *extra], args.ranks)
                report = json.loads((run / "report.json").read_text())
                xyz = read_model(str(run / "refined.cif")).xyz
                after = report["after"]
                rama = report["validation"]["final"]["ramachandran"]
                row = {"resolution": res, "start": start_name, "protocol": protocol,
                       "rmsd": round(rmsd(xyz, truth.xyz), 3), "ca_rmsd": round(rmsd(xyz, truth.xyz, ca), 3),
                       "bond_rmsd": after["bond_rmsd"], "angle_rmsd": after["angle_rmsd"],
                       "rama_outliers": rama["outlier"], "clashes": after["clashes"],
                       "seconds": round(seconds, 1),
                       "steps": {r["step"]: r.get("seconds") for r in report["protocol"]}}
                rows.append(row)
                print(f"{res:4.1f}A {start_name:8s} {protocol:22s} {row['rmsd']:6.3f} {row['ca_rmsd']:6.3f} "
                      f"{row['bond_rmsd']:7.4f} {row['angle_rmsd']:6.2f} {row['rama_outliers']:8d} "
                      f"{row['clashes']:7d} {seconds:7.1f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
