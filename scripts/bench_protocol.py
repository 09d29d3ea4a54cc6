"""Measures the protocol steps (hpcrefine.protocol) on real models and prints the numbers.

  (a) flexible fitting: adk open (4AKE chain A) into a simulated 5 A map of adk closed (1AKE,
      seed 1), with the resolution's default protocol and the three domains as rigid groups
      (--rigid-groups "A:1-29,A:60-121,A:160-214|A:30-59|A:122-159"); C-alpha RMSD to the closed form in place
      (the map frame is absolute: no superposition after refinement), per domain (CORE, NMP 30-59,
      LID 122-159) after every protocol step and macro-cycle, geometry and Ramachandran outliers.
      The open model is first placed in the map as a structural biologist would: superposed onto
      the closed model on the CORE C-alphas only (gemmi.superpose_positions), so that its core sits
      in the core density and the NMP and LID domains start 11 and 15 A away.
  (b) rigid bodies: chains D, E, F of the 7cth asymmetric unit in a simulated 4 A map, each chain
      rotated by 4 degrees about a random axis through its centre and shifted by 1.5 A, refined
      with --protocol rigid alone; C-alpha RMSD to the true model.
  (c) ADP: the true adk closed model in its simulated 3.5 A map with every B set to the mean,
      --protocol adp alone; Pearson r of refined against true B (atoms and residues).

    python scripts/bench_protocol.py [--ranks K] [--only a b c] [--workdir DIR] [--compare P ...]
        [--rigid-groups SPEC] [--extra "REFINE OPTIONS"]

--rigid-groups replaces the three hand-given domains of (a), e.g. by "auto" (the domains
hpcrefine.protocol.domains finds in the start model); --extra adds options to every refine run of
(a), e.g. "--cycle-rotamers off".

With --ranks K > 1 the refinements run under mpiexec -n K.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gemmi
import h5py
import numpy as np

from hpcrefine import datasets
from hpcrefine.modelio import read_model, updated_structure, write_model
from hpcrefine.simulate import write_simulated

BIN = Path(sys.executable).parent
DOMAINS = {"NMP": (30, 59), "LID": (122, 159)}
ADK_DOMAINS = "A:1-29,A:60-121,A:160-214|A:30-59|A:122-159"       # CORE | NMP | LID


def refine(args: list[str], ranks: int) -> float:
    cmd = [str(BIN / "hpcrefine"), "refine", *args, "--overwrite"]
    if ranks > 1:
        cmd = [str(BIN / "mpiexec"), "-n", str(ranks), *cmd]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"refine failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def ca_pairs(model, ref):
    """Indices of matching C-alphas (chain, residue number) of model and ref, and residue numbers."""
    def index(m):
        return {(m.res_chain[m.res_index[i]], m.res_seqid[m.res_index[i]]): i
                for i in range(m.n_atoms) if m.atom_name[i] == "CA"}
    a, b = index(model), index(ref)
    keys = [k for k in a if k in b]
    return (np.array([a[k] for k in keys]), np.array([b[k] for k in keys]),
            np.array([int(k[1]) for k in keys]))


def rms(d2) -> float:
    return float(np.sqrt(np.mean(d2))) if len(d2) else float("nan")


def domain_rmsd(xyz, ref_xyz, ia, ib, num) -> dict:
    d2 = np.sum((xyz[ia] - ref_xyz[ib]) ** 2, axis=1)
    out = {"all": rms(d2)}
    core = np.ones(len(num), dtype=bool)
    for name, (lo, hi) in DOMAINS.items():
        sel = (num >= lo) & (num <= hi)
        core &= ~sel
        out[name] = rms(d2[sel])
    out["CORE"] = rms(d2[core])
    return out


def trajectory(run: Path):
    with h5py.File(run / "checkpoint.h5", "r") as f:
        return f["trajectory/xyz"][()].astype(np.float64), [json.loads(s) for s in f["trajectory/info"]]


def frame_label(info: dict) -> str:
    if info["stage"] == "prepare":
        return f"prepare: {info['step']}"
    if info["stage"] == "final":
        return f"macro-cycle {info['cycle']}"
    return info["stage"]


def bench_flex(work: Path, ranks: int, compare: list[str], groups: str = ADK_DOMAINS,
               extra_args: tuple = ()) -> dict:
    paths = datasets.fetch(["adk_open", "adk_closed"])
    maps = work / "adk_closed_5A"
    write_simulated(paths["adk_closed"], 5.0, str(maps), seed=1, overwrite=True)
    opened, closed = read_model(paths["adk_open"]), read_model(paths["adk_closed"])
    ia, ib, num = ca_pairs(opened, closed)
    core = np.ones(len(num), dtype=bool)
    for lo, hi in DOMAINS.values():
        core &= ~((num >= lo) & (num <= hi))
    sup = gemmi.superpose_positions([gemmi.Position(*p) for p in closed.xyz[ib][core]],
                                    [gemmi.Position(*p) for p in opened.xyz[ia][core]])
    tr = sup.transform
    rot = np.array(tr.mat.tolist())
    vec = np.array(tr.vec.tolist())
    placed = opened.xyz @ rot.T + vec
    start = work / "adk_open_placed"
    write_model(updated_structure(opened, placed), str(start))
    run = work / "flex"
    seconds = refine([f"{start}.cif", "--map", str(maps / "full.mrc"), "--resolution", "5",
                      "--rigid-groups", groups, *extra_args, "--output", str(run)], ranks)
    frames, infos = trajectory(run)
    print(f"(a) flexible fitting, adk open -> simulated 5 A map of adk closed ({ranks} rank(s), "
          f"{seconds:.1f} s); core superposition of the start: {sup.rmsd:.2f} A over {int(core.sum())} CA; "
          f"rigid groups {groups}")
    print("    C-alpha RMSD to adk closed in place (A):   all    CORE    NMP    LID")
    steps = []
    for xyz, info in zip(frames, infos):
        if info["stage"] == "halfset":
            continue
        r = domain_rmsd(xyz, closed.xyz, ia, ib, num)
        steps.append({"step": frame_label(info), **{k: round(v, 3) for k, v in r.items()}})
        print(f"    {frame_label(info):36s} {r['all']:6.2f} {r['CORE']:7.2f} {r['NMP']:6.2f} {r['LID']:6.2f}")
    final = read_model(str(run / "refined.cif"))
    r = domain_rmsd(final.xyz, closed.xyz, ia, ib, num)
    report = json.loads((run / "report.json").read_text())
    after = report["after"]
    rama = report["validation"]["final"]["ramachandran"]
    rama0 = report["validation"]["start"]["ramachandran"]
    print(f"    {'refined.cif':36s} {r['all']:6.2f} {r['CORE']:7.2f} {r['NMP']:6.2f} {r['LID']:6.2f}")
    print(f"    geometry: bonds {after['bond_rmsd']:.4f} A, angles {after['angle_rmsd']:.2f} deg, "
          f"clashes {after['clashes']}, CC_mask {after.get('cc_mask', float('nan')):.3f}")
    print(f"    Ramachandran outliers: {rama['outlier']} of {rama['n']} ({rama['outlier_pct']:.1f} %; "
          f"start {rama0['outlier']}), favoured {rama['favoured_pct']:.1f} %")
    others = {}
    variants = [("default protocol, no --rigid-groups", [])]
    variants += [(f"--protocol {p}", ["--rigid-groups", groups, "--protocol", p]) for p in compare]
    for i, (label, extra) in enumerate(variants):
        run = work / f"flex_compare{i}"
        seconds = refine([f"{start}.cif", "--map", str(maps / "full.mrc"), "--resolution", "5",
                          *extra, *extra_args, "--output", str(run)], ranks)
        rep = json.loads((run / "report.json").read_text())
        rr = domain_rmsd(read_model(str(run / "refined.cif")).xyz, closed.xyz, ia, ib, num)
        others[label] = {k: round(v, 3) for k, v in rr.items()}
        print(f"    {label:36s} {rr['all']:6.2f} {rr['CORE']:7.2f} {rr['NMP']:6.2f} {rr['LID']:6.2f}"
              f"  (bonds {rep['after']['bond_rmsd']:.4f}, angles {rep['after']['angle_rmsd']:.2f}, {seconds:.1f} s)")
    return {"seconds": round(seconds, 1), "trajectory": steps, "final": r, "bond_rmsd": after["bond_rmsd"],
            "angle_rmsd": after["angle_rmsd"], "rama_outliers": rama["outlier"], "rama_n": rama["n"],
            "protocol": report["parameters"]["protocol"], "compared": others}


def displace_chains(model, rng, degrees: float, shift: float) -> np.ndarray:
    from hpcrefine.protocol.rigid import rotation

    xyz = model.xyz.copy()
    for c in dict.fromkeys(model.chain.tolist()):
        sel = model.chain == c
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        centre = xyz[sel].mean(axis=0)
        xyz[sel] = (xyz[sel] - centre) @ rotation(np.radians(degrees) * axis).T + centre + shift * direction
    return xyz


def bench_rigid(work: Path, ranks: int) -> dict:
    path = datasets.fetch(["7cth"])["7cth"]
    st = gemmi.read_structure(path)
    st.setup_entities()
    keep = {"D", "E", "F"}
    for i in range(len(st[0]) - 1, -1, -1):
        if st[0][i].name not in keep:
            del st[0][i]
    st.remove_ligands_and_waters()
    st.remove_hydrogens()
    truth = work / "7cth_DEF"
    st.setup_entities()
    st.make_mmcif_document().write_file(f"{truth}.cif")
    model = read_model(f"{truth}.cif")
    write_simulated(f"{truth}.cif", 4.0, str(work / "7cth_4A"), seed=1, overwrite=True)
    xyz = displace_chains(model, np.random.default_rng(7), 4.0, 1.5)
    start = work / "7cth_DEF_displaced"
    write_model(updated_structure(model, xyz), str(start))
    ia, ib, _ = ca_pairs(model, model)
    before = rms(np.sum((xyz[ia] - model.xyz[ib]) ** 2, axis=1))
    run = work / "rigid"
    seconds = refine([f"{start}.cif", "--map", str(work / "7cth_4A" / "full.mrc"), "--resolution", "4",
                      "--protocol", "rigid", "--output", str(run)], ranks)
    out = read_model(str(run / "refined.cif"))
    after = rms(np.sum((out.xyz[ia] - model.xyz[ib]) ** 2, axis=1))
    print(f"(b) rigid bodies: 7cth chains D, E, F ({model.n_atoms} atoms) in a simulated 4 A map, each "
          f"chain rotated 4 deg and shifted 1.5 A: CA RMSD {before:.3f} -> {after:.3f} A "
          f"({ranks} rank(s), {seconds:.1f} s)")
    return {"atoms": model.n_atoms, "ca_rmsd_before": round(before, 3), "ca_rmsd_after": round(after, 3),
            "seconds": round(seconds, 1)}


def bench_adp(work: Path, ranks: int) -> dict:
    path = datasets.fetch(["adk_closed"])["adk_closed"]
    maps = work / "adk_closed_3.5A"
    write_simulated(path, 3.5, str(maps), seed=1, overwrite=True)
    model = read_model(path)
    start = work / "adk_closed_meanB"
    write_model(updated_structure(model, model.xyz, np.full(model.n_atoms, model.b.mean())), str(start))
    run = work / "adp"
    seconds = refine([f"{start}.cif", "--map", str(maps / "full.mrc"), "--resolution", "3.5",
                      "--protocol", "adp", "--output", str(run)], ranks)
    b = read_model(str(run / "refined.cif")).b
    r_atoms = float(np.corrcoef(b, model.b)[0, 1])
    n = np.bincount(model.res_index)
    r_res = float(np.corrcoef(np.bincount(model.res_index, b) / n, np.bincount(model.res_index, model.b) / n)[0, 1])
    print(f"(c) ADP: adk closed, simulated 3.5 A map, start B all {model.b.mean():.1f} A^2: Pearson r with "
          f"the true B {r_atoms:.3f} (atoms), {r_res:.3f} (residue means); refined mean {b.mean():.1f}, "
          f"true mean {model.b.mean():.1f} A^2 ({ranks} rank(s), {seconds:.1f} s)")
    return {"r_atoms": round(r_atoms, 3), "r_residues": round(r_res, 3), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=1)
    ap.add_argument("--only", nargs="+", choices=["a", "b", "c"], default=["a", "b", "c"])
    ap.add_argument("--workdir", help="keep the runs here (default: a temporary folder)")
    ap.add_argument("--json", help="write the numbers to this file")
    ap.add_argument("--rigid-groups", default=ADK_DOMAINS, metavar="SPEC",
                    help="(a) rigid groups instead of the three adk domains, e.g. auto")
    ap.add_argument("--extra", default="", help="(a) more refine options, e.g. \"--cycle-rotamers off\"")
    ap.add_argument("--compare", nargs="*", default=[], metavar="PROTOCOL",
                    help="(a) also with these protocols, e.g. minimise rigid,morph,minimise")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_protocol_"))
    work.mkdir(parents=True, exist_ok=True)
    out = {}
    if "a" in args.only:
        out["flex"] = bench_flex(work, args.ranks, args.compare, args.rigid_groups, tuple(args.extra.split()))
    if "b" in args.only:
        out["rigid"] = bench_rigid(work, args.ranks)
    if "c" in args.only:
        out["adp"] = bench_adp(work, args.ranks)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
