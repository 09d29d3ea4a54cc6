#!/usr/bin/env python
"""Benchmark: low-resolution restraints on adenylate kinase (1AKE) against simulated 6 A maps
(`--resolution` for others).

The true model is refined from starts shaken by 0.8 A rms (maps with seed 1, starts with the given
seeds), once with covalent restraints only (`--ss-restraints off --rama-restraints off
--rotamer-restraints off`) and once with the defaults at 6 A (secondary-structure H-bonds,
Ramachandran and rotamer restraints on); with
`--reference MODEL` also a third time with reference-model torsions (e.g. the open form of the
enzyme, `hpcrefine data path adk_open`). Prints per run: Ramachandran outliers and favoured (%,
report.json "validation" -> "final"), all-atom and C-alpha RMSD to the truth, bond and angle rmsd,
CC_mask, and the O..N distances of the truth's helix H-bonds (those under 3.5 A in the truth:
mean, rms deviation from the truth's own distances, and how many exceed 3.5 A) with the rms
deviation of their C=O..N angles from the truth's (degrees).

    python scripts/bench_lowres.py --workdir /tmp/bench_lowres [--seeds 2 3] [--half-maps]
        [--reference PATH] [--protocol minimise] [--params FILE.toml]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hpcrefine import datasets, simulate  # noqa: E402
from hpcrefine.compare import rmsd  # noqa: E402
from hpcrefine.lowres import HELIX, find_secondary_structure  # noqa: E402
from hpcrefine.modelio import read_model, updated_structure, write_model  # noqa: E402

RESOLUTION = 6.0
TRUE_HBOND_CUTOFF = 3.5      # A: the truth's helix H-bonds (DSSP-like distance)


def truth_helix_hbonds(truth: str):
    """(O atoms, N atoms, keys) of the helix H-bonds of the true model, keys (chain, seqid, name)
    so they can be found in any model of the same structure."""
    m = read_model(truth)
    ss = find_secondary_structure(m, m.xyz, cutoff=TRUE_HBOND_CUTOFF)
    h = ss.kind == HELIX
    keys = []
    for o, n in zip(ss.o_atom[h], ss.n_atom[h]):
        keys.append(tuple((m.chain[a], m.res_seqid[m.res_index[a]], m.atom_name[a]) for a in (o, n)))
    return keys, len(ss.helices)


def hbond_geometry(model_path: str, keys) -> tuple[np.ndarray, np.ndarray]:
    """O..N distances (A) and C=O..N angles (degrees) of the H-bonds keys name."""
    from hpcrefine.core.geometry import angle_values

    m = read_model(model_path)
    index = {(m.chain[a], m.res_seqid[m.res_index[a]], m.atom_name[a]): a for a in range(m.n_atoms)}
    o = np.array([index[k[0]] for k in keys])
    n = np.array([index[k[1]] for k in keys])
    c = np.array([index[(k[0][0], k[0][1], "C")] for k in keys])
    return (np.linalg.norm(m.xyz[o] - m.xyz[n], axis=1),
            angle_values(m.xyz, np.stack([c, o, n], axis=1)))


def refine(start: str, maps: Path, outdir: Path, half_maps: bool, extra: list[str],
           resolution: float) -> float:
    exe = Path(sys.executable).parent / "hpcrefine"
    data = (["--half-maps", str(maps / "half1.mrc"), str(maps / "half2.mrc")] if half_maps
            else ["--map", str(maps / "full.mrc")])
    cmd = [str(exe), "refine", start, *data, "--resolution", str(resolution), "--output",
           str(outdir), "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
    return time.perf_counter() - t0


def measure(name: str, model: str, truth: str, keys, geo_truth, report: dict | None,
            wall: float | None) -> dict:
    r = rmsd(model, truth)
    d, ang = hbond_geometry(model, keys)
    row = {"run": name, "rmsd_all": round(r["rmsd_all"], 3), "rmsd_ca": round(r["rmsd_ca"], 3),
           "hb_mean": round(float(d.mean()), 3),
           "hb_rms_dev": round(float(np.sqrt(np.mean((d - geo_truth[0]) ** 2))), 3),
           "hb_broken": int(np.sum(d > TRUE_HBOND_CUTOFF)),
           "hb_angle_rms_dev": round(float(np.sqrt(np.mean((ang - geo_truth[1]) ** 2))), 1)}
    if report is not None:
        v = report["validation"]["final"]
        row.update(rama_outlier_pct=v["ramachandran"]["outlier_pct"],
                   rama_favoured_pct=v["ramachandran"]["favoured_pct"],
                   bond_rmsd=report["after"]["bond_rmsd"], angle_rmsd=report["after"]["angle_rmsd"],
                   cc_mask=report["after"].get("cc_mask"), lowres=report["restraints"],
                   wall_s=round(wall, 1))
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="bench_lowres")
    ap.add_argument("--seeds", type=int, nargs="+", default=[2], help="shake seeds (maps use seed 1)")
    ap.add_argument("--half-maps", action="store_true", help="refine against the half maps")
    ap.add_argument("--reference", help="also refine with this reference model")
    ap.add_argument("--params", help="a TOML parameter file for every run")
    ap.add_argument("--protocol", help="refine's --protocol for every run (default: refine's own)")
    ap.add_argument("--resolution", type=float, default=RESOLUTION, help="of the simulated maps (A)")
    args = ap.parse_args()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    truth = datasets.fetch(["adk_closed"])["adk_closed"]
    maps = work / f"maps{args.resolution:g}"
    if not (maps / "full.mrc").exists():
        simulate.write_simulated(truth, args.resolution, str(maps), seed=1)
    keys, n_helices = truth_helix_hbonds(truth)
    d_truth = hbond_geometry(truth, keys)[0]
    keys = [k for k, d in zip(keys, d_truth) if d < TRUE_HBOND_CUTOFF]
    geo_truth = hbond_geometry(truth, keys)
    d_truth = geo_truth[0]
    print(f"truth: {n_helices} helices, {len(keys)} helix H-bonds (O..N < {TRUE_HBOND_CUTOFF} A), "
          f"mean O..N {d_truth.mean():.3f} A")
    runs = [("covalent only", ["--ss-restraints", "off", "--rama-restraints", "off",
                               "--rotamer-restraints", "off"]),
            ("low-resolution restraints", [])]
    if args.reference:
        runs.append(("+ reference " + Path(args.reference).stem,
                     ["--reference", args.reference] + runs[1][1]))
    rows = []
    for seed in args.seeds:
        model = read_model(truth)
        start = str(work / f"start{seed}")
        write_model(updated_structure(model, simulate.shake(model.xyz, 0.8, seed)), start)
        rows.append({"seed": seed, **measure("start", start + ".cif", truth, keys, geo_truth, None, None)})
        for k, (name, extra) in enumerate(runs):
            out = work / f"seed{seed}_run{k}"
            common = (["--params", args.params] if args.params else []) + (
                ["--protocol", args.protocol] if args.protocol else [])
            wall = refine(start + ".cif", maps, out, args.half_maps, extra + common, args.resolution)
            report = json.loads((out / "report.json").read_text())
            rows.append({"seed": seed, **measure(name, str(out / "refined.cif"), truth, keys, geo_truth,
                                                 report, wall)})
    head = (f"{'seed':>4} {'run':<28} {'rama out%':>9} {'fav%':>6} {'RMSD all/CA (A)':>15} "
            f"{'bonds':>6} {'angles':>6} {'CC':>6} {'helix O..N mean/rmsdev (A)':>26} {'>3.5':>4} {'C=O..N dev':>10} {'s':>5}")
    print(head)
    for r in rows:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else ""
        print(f"{r['seed']:>4} {r['run']:<28} {f('rama_outlier_pct', '9.2f'):>9} "
              f"{f('rama_favoured_pct', '6.1f'):>6} {r['rmsd_all']:>7.3f}/{r['rmsd_ca']:<7.3f} "
              f"{f('bond_rmsd', '6.4f'):>6} {f('angle_rmsd', '6.2f'):>6} {f('cc_mask', '6.3f'):>6} "
              f"{r['hb_mean']:>13.3f}/{r['hb_rms_dev']:<12.3f} {r['hb_broken']:>4} {r['hb_angle_rms_dev']:>10.1f} {f('wall_s', '5.1f'):>5}")
    (work / "bench_lowres.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
