#!/usr/bin/env python
"""Validation table of the example models: the true model, the shaken start and the refined model.

    python scripts/bench_validation_table.py [--models adk_closed 7cth 6zu5] [--workdir DIR]
                                             [--ranks 3] [--force]

For each model (a dataset name of `hpcrefine data path`): simulated 3.5 A maps of the true model
(`hpcrefine simulate TRUTH --resolution 3.5 --seed 1`), a start shaken by 0.8 A rms
(`hpcrefine shake TRUTH --rms 0.8 --seed 2`), the refinement
(`mpiexec -n 3 hpcrefine refine start.cif --half-maps half1.mrc half2.mrc --resolution 3.5`,
whose report.json holds the validation of the start and final models against the full map), and
`hpcrefine validate TRUTH --map full.mrc --resolution 3.5` of the true model. Maps, starts and
results are cached under --workdir (default ~/.cache/hpcrefine/bench_validation, one directory per
model); a step whose output exists is skipped unless --force. One refinement runs at a time.
Prints one markdown table: per model the rows truth, start, refined; RMSD to truth is over all
matched atoms (hpcrefine.compare.rmsd); the wall time is the refinement's (report.json
`wall_seconds`). Geometry, Ramachandran, rotamer, C-beta, clash and FSCavg figures of start and
refined are report.json's "validation"; CC_mask is against full.mrc for every row (the start and
refined models are also run through `hpcrefine validate --map full.mrc`), and "CC_mask (refine's
map)" is report.json's, against the FSC-weighted map refine fits (higher: its noisy shells are
damped).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESOLUTION = 3.5


def run(cmd: list[str], log: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    t0 = time.perf_counter()
    print("  $ " + " ".join(cmd), file=sys.stderr, flush=True)
    with open(log, "w") as fh:
        p = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    print(f"    ({time.perf_counter() - t0:.0f} s, log {log})", file=sys.stderr, flush=True)
    if p.returncode != 0:
        sys.exit(f"failed (exit {p.returncode}): {' '.join(cmd)}; see {log}")


def prepare_and_run(name: str, work: Path, ranks: int, force: bool) -> dict:
    from hpcrefine import datasets

    hp = shutil.which("hpcrefine") or str(Path(sys.executable).parent / "hpcrefine")
    mpiexec = shutil.which("mpiexec") or str(Path(sys.executable).parent / "mpiexec")
    truth = datasets.fetch([name])[name]
    work.mkdir(parents=True, exist_ok=True)
    maps = work / "maps"
    res = str(RESOLUTION)
    print(f"{name}: {truth}", file=sys.stderr, flush=True)
    if force or not (maps / "full.mrc").exists() or not (maps / "half2.mrc").exists():
        run([hp, "simulate", truth, "--resolution", res, "--seed", "1", "--output", str(maps)]
            + (["--overwrite"] if force else []), work / "simulate.log")
    start = work / "start.cif"
    if force or not start.exists():
        run([hp, "shake", truth, "--rms", "0.8", "--seed", "2", "--output", str(start)], work / "shake.log")
    vt = work / "validate_truth"
    if force or not (vt / "validation.json").exists():
        cmd = [hp, "validate", truth, "--map", str(maps / "full.mrc"), "--resolution", res, "--output", str(vt)]
        if force:
            cmd.append("--overwrite")
        run(cmd, work / "validate_truth.log")
    out = work / "refine"
    if force or not (out / "report.json").exists():
        if force and out.exists():
            shutil.rmtree(out)
        run([mpiexec, "-n", str(ranks), hp, "refine", str(start), "--half-maps", str(maps / "half1.mrc"),
             str(maps / "half2.mrc"), "--resolution", res, "--output", str(out)], work / "refine.log")
    # the start and refined models against full.mrc as well: refine validates against its own
    # FSC-weighted map (half-map FSC damping of noisy shells), whose CC_mask is higher than
    # against full.mrc; these make CC_mask comparable with the truth row
    for label, path in (("start", start), ("refined", out / "refined.cif")):
        vd = work / f"validate_{label}"
        if force or not (vd / "validation.json").exists():
            cmd = [hp, "validate", str(path), "--map", str(maps / "full.mrc"), "--resolution", res,
                   "--output", str(vd)]
            if force:
                cmd.append("--overwrite")
            run(cmd, work / f"validate_{label}.log")
    return {"truth": truth, "start": str(start), "validate_truth": str(vt / "validation.json"),
            "validate_start": str(work / "validate_start" / "validation.json"),
            "validate_refined": str(work / "validate_refined" / "validation.json"),
            "report": str(out / "report.json"), "refined": str(out / "refined.cif")}


def row_values(v: dict, full: dict | None) -> list[str]:
    """v: the row's validation (report.json for start/refined); full: its validation against
    full.mrc (hpcrefine validate), for the CC_mask column."""
    g, m = v["geometry"], v["map"]
    cc_refine = f"{m['cc_mask']:.4f}" if full is not None else ""
    cc_full = (full or v)["map"]["cc_mask"]
    return [f"{g['bond_rmsd']:.4f}", f"{g['angle_rmsd']:.2f}",
            f"{v['ramachandran']['favoured_pct']:.2f}", f"{v['ramachandran']['outlier_pct']:.2f}",
            f"{v['rotamers']['outlier_pct']:.2f}", f"{v['cbeta']['outliers']}",
            f"{v['clashes']['clashscore']:.2f}", f"{cc_full:.4f}", cc_refine, f"{m['fsc_avg']:.4f}"]


def table(name: str, files: dict) -> list[str]:
    from hpcrefine.compare import rmsd

    report = json.loads(Path(files["report"]).read_text())
    load = lambda key: json.loads(Path(files[key]).read_text())  # noqa: E731
    r_start = rmsd(files["start"], files["truth"])["rmsd_all"]
    r_final = rmsd(files["refined"], files["truth"])["rmsd_all"]
    label = f"{name} ({report['n_atoms']:,} atoms)"
    val = report["validation"]
    return [f"| {label} | truth | " + " | ".join(row_values(load("validate_truth"), None)) + " | 0 | |",
            f"| {label} | start | " + " | ".join(row_values(val["start"], load("validate_start")))
            + f" | {r_start:.3f} | |",
            f"| {label} | refined | " + " | ".join(row_values(val["final"], load("validate_refined")))
            + f" | {r_final:.3f} | {report['wall_seconds']:.0f} s |"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["adk_closed", "7cth", "6zu5"])
    ap.add_argument("--workdir", default=os.path.join(os.path.expanduser("~"), ".cache", "hpcrefine",
                                                      "bench_validation"))
    ap.add_argument("--ranks", type=int, default=3, help="MPI ranks of the refinement (default 3)")
    ap.add_argument("--force", action="store_true", help="redo every step even if its output exists")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    files = {name: prepare_and_run(name, work / name, args.ranks, args.force) for name in args.models}
    print("| model | row | bond rmsd (A) | angle rmsd (deg) | Rama favoured % | Rama outliers % "
          "| rotamer outliers % | C-beta outliers | clashscore | CC_mask | CC_mask (refine's map) | FSCavg "
          "| RMSD to truth (A) "
          "| refine wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.models:
        for line in table(name, files[name]):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
