"""Measures the rotamer-fitting step (hpcrefine.protocol.rotamer_fit) on adk and prints the numbers.

Truth: adenylate kinase, closed (adk_closed). Maps: simulated from the truth (seed 1) at each
resolution asked for. Start: the truth with every side chain the step can fit set to a library
rotamer whose chi 1 differs from the true chi 1 by more than 60 degrees, chosen at random (seed
--seed) with the library's probabilities, plus optional Gaussian noise on every atom (--noise, A
rms). For the start, the start after rotamer fitting, and both after `minimise` (choose_weight
and L-BFGS macro-cycles of the fast target in this process, as the refinement's final stage does
them), it prints: the fraction of the fitted side chains with chi 1 within 40 degrees of the
truth, the side-chain RMSD to the truth (atoms beyond CB of those residues; the two equivalent
atoms of Asp, Glu, Phe and Tyr matched as their swap fits best), rotamer outliers
(validation.rotamer), the clashscore (validation.clash) and the wall time; and the rotamer step
run from the truth itself: how many side chains it changes and how many it moves away (chi 1 more
than 40 degrees off the truth).

With --compare-restraints, the rotamer step's output is minimised three times instead: with the
covalent restraints alone (rotamer restraints off), with rotamer restraints (hpcrefine.lowres,
ss and Ramachandran restraints left off) towards the rotamers nearest to the fitted side chains
(the model minimisation starts from: what `refine --protocol rotamer,minimise` does, since it
rebuilds the low-resolution restraints after the prepare steps, refine.retarget_lowres), and with
rotamer restraints towards those nearest to the wrong start (what it did before that).

With --refine-compare, the whole `hpcrefine refine` command runs instead (one process, the
resolution's defaults) from two starts, the wrong rotamers above and the truth, each shaken by
--noise A rms (0.5 if not given), with --cycle-rotamers off, on searching every side chain
(cycle_rotamer_select "all") and on searching the selection (cycle_rotamer_select
"outliers_poor_map", threshold --poor-map or the default), by default protocol and, unless
--no-rotamer-first, with rotamer before it (--protocol rotamer,...), and prints for each refined
model the same side-chain figures, the all-atom and C-alpha RMSD to the truth, the wall time and
the side chains the per-cycle steps searched, the CPU seconds of the run and the seconds of its
per-cycle rotamer steps (the report's timings; wall times vary with the machine's load).

With --time-step NAME (adk_closed or 7cth: the asymmetric unit, 16,667 atoms), one rotamer step
as the macro-cycles run it is timed instead, at the first resolution, in a simulated map of the
model, from the model shaken by --noise A rms (0.5 if not given): searching every side chain and
searching the selection, after --cycles macro-cycles of minimisation (as the step sees the model
between macro-cycles).

With --selection-stats, for the two starts of --refine-compare after one macro-cycle of
minimisation (as the first per-cycle step sees them): the side chains with chi 1 more than 40
degrees off the truth, the rotamer outliers, the percentiles of rho at the current place (the
step's map term) of the wrong and the right side chains, and for each --thresholds T how many
side chains the selection (outliers or rho < T) picks and how many of the wrong ones it catches.

    python scripts/bench_rotamer.py [--resolutions 3 4 6] [--noise 0.0] [--cycles 2]
        [--margin M --clash-weight W --prior-weight P --blur B --passes N --no-sigma]
        [--compare-restraints | --refine-compare [--workdir DIR] [--no-rotamer-first]
         [--poor-map T] | --time-step NAME | --selection-stats [--thresholds 0.75 1 1.25]]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
import types

import numpy as np

from hpcrefine import datasets, simulate
from hpcrefine.engine import GeometryTerm, RealSpaceTerm, choose_weight, initial_weight, minimise
from hpcrefine.lowres import add_lowres_restraints
from hpcrefine.modelio import read_model, read_structure
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.params import build_params
from hpcrefine.protocol.param import ParamRunner
from hpcrefine.protocol.rotamer_fit import current_chis, make_scorer, set_chis, side_chains, rotamer_step
from hpcrefine.refine import atom_weights
from hpcrefine.topology import build_restraints
from hpcrefine.validation import clash, rotamer
from hpcrefine.validation.residues import residue_table

SWAPS = {"ASP": [("OD1", "OD2")], "GLU": [("OE1", "OE2")],
         "PHE": [("CD1", "CD2"), ("CE1", "CE2")], "TYR": [("CD1", "CD2"), ("CE1", "CE2")]}


def wrong_start(model, chains, seed: int, noise: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    xyz = model.xyz.copy()
    for sc in chains:
        lib = rotamer.library()[sc.res_type]
        true1 = current_chis(model.xyz, sc)[0]
        d1 = np.abs((lib["mean"][:, 0] - true1 + 180.0) % 360.0 - 180.0)
        far = np.nonzero(d1 > 60.0)[0]
        k = rng.choice(far, p=lib["prob"][far] / lib["prob"][far].sum())
        xyz[sc.atoms] = set_chis(xyz[sc.atoms], sc, lib["mean"][k][None])[0]
    if noise > 0:
        xyz = simulate.shake(xyz, noise, seed=seed + 1)
    return xyz


def side_chain_figures(model, chains, xyz, truth) -> dict:
    ok1, sq, n = 0, 0.0, 0
    for sc in chains:
        d = (current_chis(xyz, sc)[0] - current_chis(truth, sc)[0] + 180.0) % 360.0 - 180.0
        ok1 += abs(d) <= 40.0
        sel = sc.atoms[sc.beyond_cb]
        best = np.sum((xyz[sel] - truth[sel]) ** 2)
        if sc.res_type in SWAPS:
            names = list(model.atom_name[sel])
            perm = np.arange(len(sel))
            for a, b in SWAPS[sc.res_type]:
                ia, ib = names.index(a), names.index(b)
                perm[ia], perm[ib] = ib, ia
            best = min(best, np.sum((xyz[sel][perm] - truth[sel]) ** 2))
        sq += best
        n += len(sel)
    table = residue_table(model, xyz, rotamer.ATOM_NAMES)
    rot = rotamer.summary(rotamer.analyse(table, xyz))
    return {"chi1_ok": ok1 / len(chains), "sc_rmsd": float(np.sqrt(sq / n)), "outliers": rot["outlier"],
            "clashscore": float(clash.analyse(model, xyz, RESTRAINTS)["clashscore"])}


def moved_away(chains, xyz, truth) -> int:
    """Side chains whose chi 1 is more than 40 degrees from the truth's."""
    d = [(current_chis(xyz, sc)[0] - current_chis(truth, sc)[0] + 180.0) % 360.0 - 180.0 for sc in chains]
    return int(np.sum(np.abs(d) > 40.0))


def run_minimise(model, xyz, data, origin, voxel, params, cycles: int,
                 restraints=None) -> tuple[np.ndarray, float]:
    """Macro-cycles from xyz with the given restraints (default: the covalent ones)."""
    t0 = time.perf_counter()
    term = RealSpaceTerm(data, origin, voxel, atom_weights(model))
    geom = GeometryTerm(RESTRAINTS if restraints is None else restraints, params)
    w = initial_weight(xyz, term, geom)
    for _ in range(cycles):
        w, _ = choose_weight(xyz, term, geom, params, w)
        xyz = minimise(xyz, term, geom, w, params.iterations, params).xyz
    return xyz, time.perf_counter() - t0


def line(label, fig, seconds=None) -> str:
    t = f"  {seconds:6.1f} s" if seconds is not None else ""
    return (f"  {label:<26} chi1 within 40 deg {100 * fig['chi1_ok']:5.1f} %   side-chain RMSD "
            f"{fig['sc_rmsd']:5.2f} A   rotamer outliers {fig['outliers']:3d}   clashscore "
            f"{fig['clashscore']:6.2f}{t}")


def main() -> None:
    global RESTRAINTS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolutions", type=float, nargs="+", default=[3.0, 4.0, 6.0])
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--noise", type=float, default=0.0)
    ap.add_argument("--cycles", type=int, default=2, help="macro-cycles of the minimise that follows (0: none)")
    ap.add_argument("--margin", type=float)
    ap.add_argument("--clash-weight", type=float)
    ap.add_argument("--prior-weight", type=float)
    ap.add_argument("--blur", type=float)
    ap.add_argument("--passes", type=int)
    ap.add_argument("--no-sigma", action="store_true", help="library means only")
    ap.add_argument("--compare-restraints", action="store_true",
                    help="minimise the rotamer step's output with rotamer restraints off and on")
    ap.add_argument("--refine-compare", action="store_true",
                    help="whole refine runs with and without --cycle-rotamers (module docstring)")
    ap.add_argument("--workdir", help="--refine-compare: keep the runs here (default: a temporary folder)")
    ap.add_argument("--no-rotamer-first", action="store_true",
                    help="--refine-compare: the default protocol only (no rotamer,<default> runs)")
    ap.add_argument("--poor-map", type=float, help="cycle_rotamer_poor_map of the selection runs (map sd)")
    ap.add_argument("--time-step", metavar="NAME", choices=["adk_closed", "7cth"],
                    help="time one per-cycle rotamer step, all against the selection (module docstring)")
    ap.add_argument("--selection-stats", action="store_true",
                    help="what the per-cycle selection picks at several thresholds (module docstring)")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.75, 1.0, 1.25])
    args = ap.parse_args()
    if args.selection_stats:
        selection_stats(args)
        return
    if args.refine_compare:
        refine_compare(args)
        return
    if args.time_step:
        time_step(args)
        return

    path = datasets.fetch(["adk_closed"])["adk_closed"]
    model = read_model(path)
    RESTRAINTS = build_restraints(model, MonomerLibrary())
    chains = side_chains(model, RESTRAINTS)
    truth = model.xyz.copy()
    start = wrong_start(model, chains, args.seed, args.noise)
    print(f"adk_closed: {model.n_atoms} atoms, {len(chains)} side chains fitted; start: each set to "
          f"a wrong rotamer (chi 1 > 60 deg off, seed {args.seed}), noise {args.noise} A rms")
    for res in args.resolutions:
        full, _, _, origin, voxel, _ = simulate.simulate_maps(read_structure(path), res, seed=1)
        params = build_params(res)
        over = {"rotamer_margin": args.margin, "rotamer_clash_weight": args.clash_weight,
                "rotamer_prior_weight": args.prior_weight, "rotamer_map_blur": args.blur,
                "rotamer_passes": args.passes, "rotamer_sample_sigma": False if args.no_sigma else None}
        params = dataclasses.replace(params, **{k: v for k, v in over.items() if v is not None})
        grid = types.SimpleNamespace(origin=origin, voxel=voxel)
        inputs = types.SimpleNamespace(model=model, restraints=RESTRAINTS, map=grid, data=full)
        print(f"\n{res:.1f} A map (margin {params.rotamer_margin}, clash weight "
              f"{params.rotamer_clash_weight}, prior weight {params.rotamer_prior_weight}, blur "
              f"{params.rotamer_map_blur}, passes {params.rotamer_passes}, sigma samples "
              f"{params.rotamer_sample_sigma}):")
        print(line("truth", side_chain_figures(model, chains, truth, truth)))
        print(line("start", side_chain_figures(model, chains, start, truth)))
        t0 = time.perf_counter()
        fitted, rec = rotamer_step(ParamRunner(None), inputs, start, params)
        print(line(f"rotamer ({rec['changed']} changed)", side_chain_figures(model, chains, fitted, truth),
                   time.perf_counter() - t0))
        if args.compare_restraints:
            compare_restraints(model, chains, start, fitted, truth, full, origin, voxel, params,
                               args.cycles)
            continue
        same, rec_t = rotamer_step(ParamRunner(None), inputs, truth, params)
        fig_t = side_chain_figures(model, chains, same, truth)
        print(line(f"truth + rotamer ({rec_t['changed']} chg)", fig_t))
        print(f"  {'rotamer from the truth':<26} {rec_t['changed']} of {rec_t['residues']} side chains "
              f"changed, {moved_away(chains, same, truth)} moved away (chi 1 more than 40 deg off)")
        if args.cycles > 0:
            m0, s0 = run_minimise(model, start, full, origin, voxel, params, args.cycles)
            print(line("start + minimise", side_chain_figures(model, chains, m0, truth), s0))
            m1, s1 = run_minimise(model, fitted, full, origin, voxel, params, args.cycles)
            print(line("rotamer + minimise", side_chain_figures(model, chains, m1, truth), s1))


def compare_restraints(model, chains, start, fitted, truth, data, origin, voxel, params, cycles) -> None:
    """`rotamer,minimise` with rotamer restraints off, on towards the fitted side chains' nearest
    rotamers, and on towards the start's (module docstring)."""
    rot = dataclasses.replace(params, ss_restraints=False, rama_restraints=False, rotamer_restraints=True)
    for label, restraints in (
            ("+ minimise, rot. off", RESTRAINTS),
            ("+ minimise, rot. fitted", add_lowres_restraints(model, RESTRAINTS, fitted, rot)),
            ("+ minimise, rot. start", add_lowres_restraints(model, RESTRAINTS, start, rot))):
        m, s = run_minimise(model, fitted, data, origin, voxel, params, cycles, restraints)
        print(line(label, side_chain_figures(model, chains, m, truth), s))


def refine_compare(args) -> None:
    """`hpcrefine refine` with and without --cycle-rotamers (module docstring)."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from hpcrefine.mapio import write_map
    from hpcrefine.modelio import updated_structure, write_model
    from hpcrefine.params import resolution_defaults

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_rotamer_"))
    work.mkdir(parents=True, exist_ok=True)
    path, model, chains, truth, noise, starts = _two_starts(args)
    ca = model.atom_name == "CA"
    hpc = str(Path(sys.executable).parent / "hpcrefine")
    modes = {"off": ("off", None), "on, all": ("on", "all"), "on, select": ("on", "outliers_poor_map")}
    for tag, (_, select) in modes.items():
        if select is not None:
            over = f"\ncycle_rotamer_poor_map = {args.poor_map}" if args.poor_map is not None else ""
            (work / f"{select}.toml").write_text(f'[refine]\ncycle_rotamer_select = "{select}"{over}\n')
    for res in args.resolutions:
        full, _, _, origin, voxel, _ = simulate.simulate_maps(read_structure(path), res, seed=1)
        map_path = work / f"full_{res:g}.mrc"
        write_map(str(map_path), full, origin, voxel)
        default = resolution_defaults(res).get("protocol", "minimise")
        print(f"\n{res:.1f} A map, hpcrefine refine (default protocol {default}), starts shaken by {noise} A:")
        for label, xyz in starts.items():
            stem = work / f"start_{label.split()[0]}"
            write_model(updated_structure(model, xyz), str(stem))
            print(line(f"{label}: start", side_chain_figures(model, chains, xyz, truth)))
            for protocol in (default,) if args.no_rotamer_first else (default, f"rotamer,{default}"):
                for mode, (cyc, select) in modes.items():
                    out = work / (f"run_{res:g}_{label.split()[0]}_{protocol.split(',')[0]}_{cyc}"
                                  f"{'_' + select if select else ''}")
                    extra = ["--params", str(work / f"{select}.toml")] if select else []
                    t0, cpu0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
                    p = subprocess.run([hpc, "refine", f"{stem}.cif", "--map", str(map_path), "--resolution",
                                        f"{res:g}", "--protocol", protocol, "--cycle-rotamers", cyc, *extra,
                                        "--output", str(out), "--overwrite"], capture_output=True, text=True)
                    if p.returncode != 0:
                        sys.exit(f"refine failed:\n{p.stderr[-3000:]}")
                    sec = time.perf_counter() - t0
                    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
                    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
                    got = read_model(str(out / "refined.cif")).xyz
                    fig = side_chain_figures(model, chains, got, truth)
                    d2 = np.sum((got - truth) ** 2, axis=1)
                    report = json.loads((out / "report.json").read_text())
                    searched = [c.get("rotamers_searched") for c in report["cycles"]]
                    searched = "/".join(str(n) for n in searched if n is not None) or "-"
                    rot_s = report["timings"].get("rotamer", {}).get("seconds", 0.0)
                    tag = f"{'rotamer,' if protocol != default else ''}cycle rot. {mode}"
                    print(line(f"  {tag}", fig, sec) + f"   RMSD all {np.sqrt(d2.mean()):.3f} A, "
                          f"CA {np.sqrt(d2[ca].mean()):.3f} A, cpu {cpu:.1f} s, cycle rotamer steps "
                          f"{rot_s:.1f} s, searched {searched}")


def _two_starts(args):
    """adk closed, its fitted side chains, the truth and the two starts of --refine-compare and
    --selection-stats: every side chain in a wrong rotamer, and the true rotamers, both shaken
    by --noise (0.5 A if not given). Sets RESTRAINTS."""
    global RESTRAINTS
    path = datasets.fetch(["adk_closed"])["adk_closed"]
    model = read_model(path)
    RESTRAINTS = build_restraints(model, MonomerLibrary())
    chains = side_chains(model, RESTRAINTS)
    truth = model.xyz.copy()
    noise = 0.5 if args.noise == 0.0 else args.noise
    starts = {"wrong rotamers": wrong_start(model, chains, args.seed, noise),
              "true rotamers": simulate.shake(truth, noise, seed=args.seed + 1)}
    return path, model, chains, truth, noise, starts


def selection_stats(args) -> None:
    """What the selection picks after one macro-cycle from each start (module docstring)."""
    path, model, chains, truth, noise, starts = _two_starts(args)
    for res in args.resolutions:
        full, _, _, origin, voxel, _ = simulate.simulate_maps(read_structure(path), res, seed=1)
        params = build_params(res)
        print(f"\n{res:.1f} A map, after one macro-cycle from starts shaken by {noise} A:")
        for label, xyz in starts.items():
            m, _ = run_minimise(model, xyz, full, origin, voxel, params, 1)
            scorer = make_scorer(model, RESTRAINTS, full, origin, voxel, params, m, chains)
            rho = scorer.current_rho(chains)
            rot = rotamer.analyse(residue_table(model, m, rotamer.ATOM_NAMES), m)
            outliers = set(rot["residue"][rot["category"] == rotamer.OUTLIER].tolist())
            outlier = np.array([sc.residue in outliers for sc in chains])
            wrong = np.array([abs((current_chis(m, sc)[0] - current_chis(truth, sc)[0] + 180.0) % 360.0
                                  - 180.0) > 40.0 for sc in chains])
            pct = {k: np.round(np.percentile(rho[w], [10, 50, 90]), 2).tolist() if w.any() else "-"
                   for k, w in (("wrong", wrong), ("right", ~wrong))}
            print(f"  {label}: {wrong.sum()} of {len(chains)} wrong, {outlier.sum()} rotamer outliers; "
                  f"rho 10/50/90 % of the wrong {pct['wrong']}, of the right {pct['right']}")
            for t in args.thresholds:
                sel = outlier | (rho < t)
                print(f"    rho < {t:g}: {sel.sum():3d} selected, {np.sum(sel & wrong)} of the "
                      f"{wrong.sum()} wrong, {np.sum(sel & ~wrong)} right")


def time_step(args) -> None:
    """One per-cycle rotamer step on a shaken model, all side chains against the selection."""
    global RESTRAINTS
    path = datasets.fetch([args.time_step])[args.time_step]
    st = read_structure(path)
    model = read_model(path)
    RESTRAINTS = build_restraints(model, MonomerLibrary())
    chains = side_chains(model, RESTRAINTS)
    res = args.resolutions[0]
    noise = 0.5 if args.noise == 0.0 else args.noise
    start = simulate.shake(model.xyz, noise, seed=args.seed + 1)
    full, _, _, origin, voxel, _ = simulate.simulate_maps(st, res, seed=1)
    params = build_params(res)
    if args.poor_map is not None:
        params = dataclasses.replace(params, cycle_rotamer_poor_map=args.poor_map)
    grid = types.SimpleNamespace(origin=origin, voxel=voxel)
    inputs = types.SimpleNamespace(model=model, restraints=RESTRAINTS, map=grid, data=full)
    start, sec = run_minimise(model, start, full, origin, voxel, params, args.cycles)
    print(f"{args.time_step}: {model.n_atoms} atoms, {len(chains)} side chains fitted; {res:g} A "
          f"simulated map; start shaken by {noise} A rms, then {args.cycles} macro-cycle(s) of "
          f"minimisation ({sec:.1f} s)")
    for select in ("all", "outliers_poor_map"):
        t0 = time.perf_counter()
        _, rec = rotamer_step(ParamRunner(None), inputs, start, params, select)
        print(f"  {select:<18} searched {rec['searched']:6d}   changed {rec['changed']:5d}   "
              f"{time.perf_counter() - t0:7.1f} s")


RESTRAINTS = None

if __name__ == "__main__":
    main()
