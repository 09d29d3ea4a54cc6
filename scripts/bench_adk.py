#!/usr/bin/env python
"""Benchmark: the foundation case, adenylate kinase (1AKE) against simulated 3.5 A half maps from a
start shaken by 0.8 A rms, refined by hpcrefine and (optionally) servalcat on the same maps and start.

Prints, for each program: wall time, peak memory, all-atom and C-alpha RMSD to the true model, and
geometry measured with one yardstick (hpcrefine's restraints) for both.

    python scripts/bench_adk.py --workdir /tmp/bench_adk [--seeds 2 3 4 5]
        [--servalcat /path/to/servalcat --servalcat-monlib DIR]
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

from hpcrefine import datasets, simulate  # noqa: E402
from hpcrefine.compare import model_geometry, rmsd  # noqa: E402
from hpcrefine.modelio import read_model, updated_structure, write_model  # noqa: E402


def run_hpcrefine(start: str, maps: Path, outdir: Path) -> dict:
    exe = Path(sys.executable).parent / "hpcrefine"
    cmd = [str(exe), "refine", start, "--half-maps", str(maps / "half1.mrc"), str(maps / "half2.mrc"),
           "--resolution", "3.5", "--output", str(outdir), "--overwrite"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"hpcrefine failed: {proc.stderr.read()}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
            "command": " ".join(cmd)}


def row(name: str, model: str, truth: str, timing: dict) -> dict:
    r = rmsd(model, truth)
    g = model_geometry(model)
    return {"program": name, **timing, "rmsd_all": round(r["rmsd_all"], 3), "rmsd_ca": round(r["rmsd_ca"], 3),
            "bond_rmsd": round(g["bond_rmsd"], 4), "angle_rmsd": round(g["angle_rmsd"], 2),
            "chiral_inversions": g["chiral_inversions"], "clashes": g["clashes"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_adk")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2], help="shake seeds (maps use seed 1)")
    ap.add_argument("--servalcat", help="servalcat executable (or its environment's python)")
    ap.add_argument("--servalcat-monlib", help="a CCP4 monomer library for servalcat (CLIBD_MON)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    truth = datasets.fetch(["adk_closed"])["adk_closed"]
    maps = work / "maps"
    if not (maps / "half1.mrc").exists():
        simulate.write_simulated(truth, 3.5, str(maps), seed=1)
    rows = []
    for seed in args.seeds:
        model = read_model(truth)
        start = work / f"start{seed}"
        write_model(updated_structure(model, simulate.shake(model.xyz, 0.8, seed)), str(start))
        start_cif = str(start) + ".cif"
        rows.append({"seed": seed, **row("start", start_cif, truth, {})})
        out = work / f"hpcrefine{seed}"
        rows.append({"seed": seed, **row("hpcrefine", str(out / "refined.cif"), truth,
                                         run_hpcrefine(start_cif, maps, out))})
        if args.servalcat:
            sys.path.insert(0, str(Path(__file__).resolve().parent))
            from bench_servalcat import run_servalcat
            for links in (False, True):
                sv = run_servalcat(start_cif, truth, 3.5, work / f"servalcat{seed}{'_links' if links else ''}",
                                   args.servalcat, args.servalcat_monlib,
                                   half_maps=(str(maps / "half1.mrc"), str(maps / "half2.mrc")),
                                   sequence_links=links)
                name = "servalcat" + (" (+sequence links)" if links else "")
                rows.append({"seed": seed, **row(name, sv["refined_model"], truth,
                                                 {"wall_s": round(sv["wall_time_s"], 2),
                                                  "peak_rss_mb": round(sv["peak_rss_mb"], 1)})})
    keys = ["seed", "program", "wall_s", "peak_rss_mb", "rmsd_all", "rmsd_ca", "bond_rmsd", "angle_rmsd",
            "chiral_inversions", "clashes"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "")) for k in keys))
    (work / "bench_adk.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
