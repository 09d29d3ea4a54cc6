#!/usr/bin/env python
"""The whole protocol (half sets + final refinement) on copies of the 7cth dengue assembly, with
the peak memory of every rank, time per stage and per evaluation, and the bytes exchanged.

    python scripts/bench_scale.py [--operators 60] [--ranks 3] [--workdir DIR]
                                  [--macro-cycles 2] [--iterations 40] [--trial-iterations 20]
                                  [--max-step A] [--decomposition boxes|blocks] [--label SUFFIX]
                                  [--prepare-only] [--full-map] [--asu] [--param KEY=VALUE ...]
    python scripts/bench_scale.py --project RUN/bench_scale.json

The true model is the 7cth asymmetric unit (10 chains, 16,667 atoms) copied by the first
--operators assembly operators (60: the whole 1,000,020-atom, 600-chain assembly, built by
scripts/bench_validate.py; fewer: ncs.expand_by_operators, e.g. 6 for 100,002 atoms, 18 for
300,006). Everything is cached under --workdir (default $HPCREFINE_DATA or ~/.cache/hpcrefine,
then bench_scale/<N>ops): simulated 3.5 A full and half maps (`hpcrefine simulate`, seed 1,
the default pixel of resolution / 3), a start shaken by --shake A rms (seed 2) and a parameter
file. Then `mpiexec -n RANKS hpcrefine refine start.cif --half-maps h1 h2 --resolution 3.5
--params FILE [--ncs off]` runs (--ncs only when `hpcrefine refine --help` offers it; with --asu
the start is the asymmetric unit with the file's first --operators assembly operators, shaken
the same way, refined under --ncs constraints against the same maps), while a
thread of this script samples every rank's /proc/<pid>/status (VmRSS, VmHWM) and smaps_rollup
(Pss, which shares the pages of a map file mapped by several ranks among them; Private_Clean +
Private_Dirty, the pages of a rank's own, without the libraries and maps it shares) every
--sample seconds. The rank of a process is read from its PMI_RANK environment variable.

Printed and written to bench_scale.json in the run folder: the wall time of each stage (report.json
"timings"), the evaluations and seconds of every rank's share of the target (report.json
"rank_resources": own terms, Allreduce, bytes reduced), the peak RSS of every rank (its own
getrusage maxrss and the sampled VmHWM), the largest sum of the ranks' RSS and PSS at one
instant, the final geometry and CC_mask, and the RMSD to the true model before and after.
The simulation's own wall time and peak RSS are measured the same way, and the seconds per
evaluation of the L-BFGS step itself on the run's coordinates (optimiser_seconds).

--project scales a measured run to 1.44 M atoms on 1, 8 and 64 nodes of 32 cores (project()).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

RESOLUTION = 3.5


def build_truth(workdir: str, n_ops: int) -> str:
    """The true model: the whole assembly (60 operators) or its first n_ops copies."""
    if n_ops >= 60:
        from bench_validate import build_assembly
        return build_assembly(workdir)
    from bench_ncs import build_truth as first_copies
    return first_copies(workdir, n_ops)


def hpcrefine_cmd(*args) -> list[str]:
    return [shutil.which("hpcrefine") or os.path.join(os.path.dirname(sys.executable), "hpcrefine"), *args]


# ------------------------------------------------------------------------------ memory sampler

def _read_status(pid: int) -> dict:
    out = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])          # kB
    return out


def _read_rollup(pid: int) -> tuple[int, int]:
    """(PSS, private) kB of a process: its proportional share of every page it maps, and the
    pages no other process maps (Private_Clean + Private_Dirty: what the rank adds to the node,
    without the libraries' pages and the map store's, which the ranks share)."""
    pss = private = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                    private += int(line.split()[1])
    except OSError:          # the rank has exited between the listing and the read
        return 0, 0
    return pss, private      # (0 from a kernel without them in smaps_rollup)


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        for c in children.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _rank_of(pid: int) -> int | None:
    """PMI_RANK of an MPI rank (0 for a plain child that runs hpcrefine), None otherwise."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().split(b"\0")
        if not any(b"hpcrefine" in c for c in cmd) or any(b"mpiexec" in c or b"hydra" in c for c in cmd):
            return None
        with open(f"/proc/{pid}/environ", "rb") as fh:
            env = dict(e.split(b"=", 1) for e in fh.read().split(b"\0") if b"=" in e)
    except OSError:
        return None
    return int(env.get(b"PMI_RANK", b"0"))


class Sampler(threading.Thread):
    """Samples the memory of the hpcrefine processes below a child process until stopped."""

    def __init__(self, root_pid: int, every: float):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.every = every
        # rank -> {"pid", "hwm_kb", "rss_max_kb", "pss_max_kb", "private_max_kb"}
        self.ranks: dict[int, dict] = {}
        self.sum_rss_max_kb = 0
        self.sum_pss_max_kb = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        pids: dict[int, int] = {}
        while not self._done.is_set():
            for pid in _descendants(self.root_pid) + [self.root_pid]:
                if pid not in pids:
                    r = _rank_of(pid)
                    if r is not None:
                        pids[pid] = r
            total_rss = total_pss = 0
            for pid, rank in list(pids.items()):
                try:
                    st = _read_status(pid)
                except OSError:
                    continue
                pss, private = _read_rollup(pid)
                row = self.ranks.setdefault(rank, {"pid": pid, "hwm_kb": 0, "rss_max_kb": 0, "pss_max_kb": 0,
                                                   "private_max_kb": 0})
                row["hwm_kb"] = max(row["hwm_kb"], st.get("VmHWM", 0))
                row["rss_max_kb"] = max(row["rss_max_kb"], st.get("VmRSS", 0))
                row["pss_max_kb"] = max(row["pss_max_kb"], pss)
                row["private_max_kb"] = max(row["private_max_kb"], private)
                total_rss += st.get("VmRSS", 0)
                total_pss += pss
            self.sum_rss_max_kb = max(self.sum_rss_max_kb, total_rss)
            self.sum_pss_max_kb = max(self.sum_pss_max_kb, total_pss)
            self.samples += 1
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def summary(self) -> dict:
        mb = 1024.0
        return {"ranks": {r: {"hwm_mb": round(v["hwm_kb"] / mb), "rss_max_mb": round(v["rss_max_kb"] / mb),
                              "pss_max_mb": round(v["pss_max_kb"] / mb),
                              "private_max_mb": round(v["private_max_kb"] / mb)}
                          for r, v in sorted(self.ranks.items())},
                "sum_rss_max_mb": round(self.sum_rss_max_kb / mb),
                "sum_pss_max_mb": round(self.sum_pss_max_kb / mb),
                "sum_hwm_mb": round(sum(v["hwm_kb"] for v in self.ranks.values()) / mb),
                "samples": self.samples}


def run_sampled(cmd: list[str], log_path: str, every: float, env=None) -> tuple[float, int, dict]:
    """Run cmd (output to log_path) while sampling its processes' memory; (wall, exit code, memory)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        sampler = Sampler(proc.pid, every)
        sampler.start()
        rc = proc.wait()
        sampler.stop()
    return time.perf_counter() - t0, rc, sampler.summary()


# ------------------------------------------------------------------------------------- the run

def prepare(args, work: str) -> dict:
    truth = build_truth(args.workdir if args.operators >= 60 else work, args.operators)
    out = {"truth": truth}
    maps = os.path.join(work, "maps")
    if not os.path.exists(os.path.join(maps, "half2.mrc")):
        cmd = hpcrefine_cmd("simulate", truth, "--resolution", str(RESOLUTION), "--output", maps,
                            "--seed", "1", "--overwrite")
        wall, rc, mem = run_sampled(cmd, os.path.join(work, "simulate.log"), args.sample)
        if rc != 0:
            raise SystemExit(f"simulate failed (exit {rc}), see {work}/simulate.log")
        out["simulate"] = {"wall_seconds": round(wall, 1), "peak_rss_mb": mem["ranks"].get(0, {}).get("hwm_mb")}
        with open(os.path.join(work, "simulate_measured.json"), "w") as fh:
            json.dump(out["simulate"], fh)
        print(f"simulated maps: {wall:.0f} s, peak RSS {out['simulate']['peak_rss_mb']} MB", flush=True)
    elif os.path.exists(os.path.join(work, "simulate_measured.json")):
        with open(os.path.join(work, "simulate_measured.json")) as fh:
            out["simulate"] = json.load(fh)
    with open(os.path.join(maps, "simulate.json")) as fh:
        sim = json.load(fh)
    out["map"] = {"box": sim["box"], "pixel": sim["pixel"], "fsc_half_0143": round(sim["fsc_half_0143"], 3)}
    start = os.path.join(work, f"start_{args.shake:g}.cif")
    if not os.path.exists(start):
        subprocess.run(hpcrefine_cmd("shake", truth, "--rms", str(args.shake), "--seed", "2", "--output", start),
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out["start"] = start
    out["half_maps"] = [os.path.join(maps, "half1.mrc"), os.path.join(maps, "half2.mrc")]
    if args.asu:
        # the same assembly given as its asymmetric unit and the file's first --operators
        # operators (the maps stay those of the assembly): one shaken copy, refined under
        # constraints by the file's symmetry
        from bench_ncs import build_asu
        out["truth"] = build_asu(work, args.operators)
        out["start"] = os.path.join(work, f"asu_start_{args.shake:g}.cif")
        if not os.path.exists(out["start"]):
            subprocess.run(hpcrefine_cmd("shake", out["truth"], "--rms", str(args.shake), "--seed", "2",
                                         "--output", out["start"]),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def write_params(args, work: str) -> str:
    step = "" if args.max_step is None else f"_step{args.max_step:g}"
    dec = "" if args.decomposition is None else f"_{args.decomposition}"
    extra = "".join(f"_{kv.replace('=', '-')}" for kv in args.param).replace('"', "").replace("'", "")
    path = os.path.join(work, f"params_{args.macro_cycles}x{args.iterations}_{args.trial_iterations}{step}{dec}"
                              f"{extra}.toml")
    with open(path, "w") as fh:
        fh.write("[refine]\n"
                 f"macro_cycles = {args.macro_cycles}\n"
                 f"iterations = {args.iterations}\n"
                 f"weight_trial_iterations = {args.trial_iterations}\n"
                 f"checkpoint_seconds = {args.checkpoint_seconds}\n"
                 + ("" if args.max_step is None else f"max_step = {args.max_step}\n")
                 + ("" if args.decomposition is None else f"decomposition = \"{args.decomposition}\"\n")
                 + "".join(f"{kv.split('=', 1)[0]} = {kv.split('=', 1)[1]}\n" for kv in args.param))
    return path


def summarise(args, case: dict, out_dir: str, wall: float, mem: dict, n_ranks: int) -> dict:
    from hpcrefine.compare import rmsd

    with open(os.path.join(out_dir, "report.json")) as fh:
        rep = json.load(fh)
    n = rep["n_atoms"]
    before = rmsd(case["start"], case["truth"])
    after = rmsd(os.path.join(out_dir, "refined.cif"), case["truth"])
    rows = rep.get("rank_resources") or []
    workers = [r for r in rows if r["evaluations"] > 0]
    evals = [r["evaluations"] for r in workers]
    per_eval = [r["seconds_local"] / r["evaluations"] for r in workers]
    result = {
        "atoms": n, "operators": args.operators, "asu": bool(args.asu), "ranks": n_ranks, "map": case["map"],
        "simulate": case.get("simulate"),
        "parameters": {"macro_cycles": args.macro_cycles, "iterations": args.iterations,
                       "weight_trial_iterations": args.trial_iterations, "shake": args.shake,
                       "max_step": args.max_step},
        "wall_seconds": round(wall, 1), "timings": rep["timings"],
        "rank_resources": rows,
        "seconds_per_evaluation_own_terms": [round(x, 4) for x in per_eval],
        "microseconds_per_atom_evaluation": [round(1e6 * r["seconds_local"] / max(r["atom_evaluations"], 1), 3)
                                             for r in workers],
        "allreduce_buffer_bytes": 8 * (3 * n + 1),
        "memory": mem,
        "before": {"bond_rmsd": rep["before"]["bond_rmsd"], "angle_rmsd": rep["before"]["angle_rmsd"],
                   "cc_mask": rep["before"].get("cc_mask"), "rmsd_all": round(before["rmsd_all"], 4),
                   "rmsd_ca": round(before["rmsd_ca"], 4)},
        "after": {"bond_rmsd": rep["after"]["bond_rmsd"], "angle_rmsd": rep["after"]["angle_rmsd"],
                  "clashes": rep["after"]["clashes"], "cc_mask": rep["after"].get("cc_mask"),
                  "rmsd_all": round(after["rmsd_all"], 4), "rmsd_ca": round(after["rmsd_ca"], 4)},
        "weight": rep["weight"],
        "halfset_final_weight": (rep.get("halfset") or {}).get("final_weight"),
        "evaluations_per_rank": evals,
    }
    return result


def print_result(res: dict) -> None:
    n = res["atoms"]
    what = (f"the asymmetric unit ({n:,} atoms) and {res['operators']} assembly operators" if res.get("asu")
            else f"{n:,} atoms ({res['operators']} copies)")
    print(f"\n{what}, {res['ranks']} ranks, map {res['map']['box']} "
          f"voxels of {res['map']['pixel']} A; wall {res['wall_seconds']:.0f} s")
    print("stages (s): " + ", ".join(f"{k} {v}" for k, v in res["timings"].items()))
    print(f"{'rank':>4} {'evals':>6} {'own s/eval':>10} {'us/atom-eval':>12} {'exchange s':>10} "
          f"{'MB sent':>11} {'NBL builds/s':>12} {'maxrss MB':>9} {'VmHWM MB':>9} {'PSS max MB':>10} {'private max MB':>14}")
    mem = res["memory"]["ranks"]
    for r in res["rank_resources"]:
        m = mem.get(r["rank"], mem.get(str(r["rank"]), {}))
        ev = max(r["evaluations"], 1)
        print(f"{r['rank']:>4} {r['evaluations']:>6} {r['seconds_local'] / ev:10.4f} "
              f"{1e6 * r['seconds_local'] / max(r['atom_evaluations'], 1):12.3f} {r['seconds_reduce']:10.1f} "
              f"{r['reduce_bytes'] / 1e6:11.1f} {str(r.get('nbl_builds', '-')) + '/' + str(r.get('seconds_nbl', '-')):>12} "
              f"{r['peak_rss_mb']:9.0f} {m.get('hwm_mb', 0):9} "
              f"{m.get('pss_max_mb', 0):10} {m.get('private_max_mb', '-'):>14}")
    m = res["memory"]
    print(f"all ranks together: largest sum of RSS {m['sum_rss_max_mb']} MB, of PSS {m['sum_pss_max_mb']} MB, "
          f"sum of peaks {m['sum_hwm_mb']} MB")
    print(f"Allreduce buffer: {res['allreduce_buffer_bytes'] / 1e6:.1f} MB per evaluation per rank "
          f"(3n+1 doubles, n = {n:,}): what the whole-model form (blocks) sends each way")
    for r in res["rank_resources"]:
        if r.get("halo_evaluations"):
            print(f"rank {r['rank']}: halo {r['halo_atoms'] / r['halo_evaluations']:,.0f} atoms on average over "
                  f"{r['halo_evaluations']} evaluations with boxes, {r['halo_builds']} list builds; "
                  f"{r['reduce_bytes'] / max(r['shared_evaluations'], 1) / 1e6:.2f} MB sent per shared evaluation")
        if r.get("subgrid_reads"):
            print(f"rank {r['rank']}: {r['subgrid_reads']} map sub-grids read, the largest "
                  f"{r['subgrid_mb']} MB")
    b, a = res["before"], res["after"]
    print(f"start: RMSD {b['rmsd_all']:.3f} A (CA {b['rmsd_ca']:.3f}), bonds {b['bond_rmsd']:.4f} A, "
          f"angles {b['angle_rmsd']:.2f} deg, CC_mask {b['cc_mask']}")
    print(f"final: RMSD {a['rmsd_all']:.3f} A (CA {a['rmsd_ca']:.3f}), bonds {a['bond_rmsd']:.4f} A, "
          f"angles {a['angle_rmsd']:.2f} deg, clashes {a['clashes']}, CC_mask {a['cc_mask']}; "
          f"weight {res['weight']}")


def optimiser_seconds(n_atoms: int, iterations: int = 20, m: int = 10) -> float:
    """Seconds per evaluation that the L-BFGS optimiser itself spends on 3 n_atoms coordinates
    (one process, the whole vector; split between workers it costs 1/workers of this): a separable quadratic whose own cost is timed and
    taken out."""
    import numpy as np

    from hpcrefine.core.lbfgs import lbfgs

    n = 3 * int(n_atoms)
    rng = np.random.default_rng(0)
    c = rng.uniform(0.5, 2.0, n)
    spent = [0, 0.0]

    def fun(x):
        t = time.perf_counter()
        g = c * x
        f = 0.5 * float(x @ g)
        spent[0] += 1
        spent[1] += time.perf_counter() - t
        return f, g
    x0 = rng.standard_normal(n)
    lbfgs(fun, x0, maxiter=2, m=m)                    # compile the kernels
    spent[:] = [0, 0.0]
    t0 = time.perf_counter()
    lbfgs(fun, x0, maxiter=iterations, m=m)
    return (time.perf_counter() - t0 - spent[1]) / spent[0]


# scalar Allreduce calls of the split L-BFGS per evaluation (m = 10: 2 m + 1 in the two-loop
# recursion, the gradient maximum, the descent check, two for the step norms, the curvature pair,
# the slope at the start and at each trial point, and f)
SCALAR_REDUCTIONS = 29


def project(res: dict, atoms: float = 1.44e6, nodes=(1, 8, 64), cores: int = 32,
            bandwidth: float = 10e9, latency: float = 2e-6, tasks_per_worker: int = 4) -> list[dict]:
    """Wall time of the same protocol on `atoms` atoms on clusters of `nodes` nodes of `cores`
    ranks, from a measured 3-rank run (res, bench_scale.json): every time measured here is taken
    per atom (or per voxel, the box assumed to grow with the atoms) and scaled by atoms / n.

    t_eval(p workers) = c n / p + t_opt n / p + t_exchange(p), with c the measured seconds per
    atom-evaluation of a rank's own terms (data, restraints, repulsion, neighbour-list builds),
    t_opt the measured seconds per coordinate of the L-BFGS step (each worker runs it on its own
    block: core.lbfgs with comm), and t_exchange the exchange of one evaluation. With boxes and
    halos (a run that measured its halos: rank_resources halo_atoms) a worker's halo of h atoms,
    measured at n / p_run atoms per worker, is taken to grow with the box surface,
    h (n / p) ^ (2/3) / (n / p_run) ^ (2/3), and t_exchange = 2 * 24 h / bandwidth
    + 2 min(p - 1, 26) * latency (the coordinates out and the gradients back, to at most the 26
    neighbouring boxes) + (SCALAR_REDUCTIONS + 1) * 2 log2(p) * latency (the optimiser's inner
    products and the displacement check) + the measured share of evaluations that gather the
    whole model again * (p - 1) / p * 24 n / bandwidth. For an older run (blocks): 2 (p - 1) / p
    * 8 (3n + 1) / bandwidth + 2 log2(p) * latency (the Allgatherv of the coordinates and the
    Reduce_scatter of the gradient) + SCALAR_REDUCTIONS * 2 log2(p) * latency. Half sets: each half's workers split into up to 4 groups, one
    weight each; a task = its evaluations at the group's t_eval + its map work (model map, FSCs,
    low-pass and blur of the full box: the measured half-set stage time less its evaluations, per
    task). Final stage: its evaluations at t_eval(all workers) plus the measured rest of the weight
    and minimise stages. Serial: reading, statistics, validation, writing, checkpoints (master)."""
    import math

    n = res["atoms"]
    scale = atoms / n
    buf = res["allreduce_buffer_bytes"]
    workers = [r for r in res["rank_resources"] if r["evaluations"] > 0]
    c = sum(r["seconds_local"] for r in workers) / sum(r["atom_evaluations"] for r in workers)
    t_opt = res["optimiser_seconds_per_evaluation"] / n
    w0 = workers[0]
    ev_final = w0["shared_evaluations"] if "shared_evaluations" in w0 else w0["reduce_bytes"] // buf
    halo_ranks = [r for r in workers if r.get("halo_evaluations")]
    p_run = len(workers)
    if halo_ranks:
        h_run = sum(r["halo_atoms"] / r["halo_evaluations"] for r in halo_ranks) / len(halo_ranks)
        regather = sum(r["halo_builds"] for r in halo_ranks) / sum(r["halo_evaluations"] for r in halo_ranks)
    ev_half = w0["evaluations"] - ev_final
    tm = {k: v["seconds"] for k, v in res["timings"].items()}
    # the measured run: half sets on 1 worker per half, final stage on 2
    half_evals_s = ev_half * (c * n + t_opt * n)
    map_per_task = max(tm.get("half sets", 0.0) - half_evals_s, 0.0) / tasks_per_worker
    final_evals_s = ev_final * (c * n / 2 + t_opt * n)
    final_rest = max(tm.get("weight", 0.0) + tm.get("minimise", 0.0) - final_evals_s, 0.0)
    serial = sum(tm.get(k, 0.0) for k in ("read inputs", "statistics", "write", "validation",
                                          "checkpoint", "ncs"))
    N = atoms
    bytes_eval = 8 * (3 * N + 1)

    def t_eval(p):
        hops = 2 * math.ceil(math.log2(p)) * latency if p > 1 else 0.0
        if p <= 1:
            comm = 0.0
        elif halo_ranks:
            h = h_run * ((N / p) / (n / p_run)) ** (2 / 3)
            comm = (2 * 24 * h / bandwidth + 2 * min(p - 1, 26) * latency + hops * (SCALAR_REDUCTIONS + 1)
                    + regather * (p - 1) / p * 24 * N / bandwidth)
        else:
            comm = 2 * (p - 1) / p * bytes_eval / bandwidth + hops * (1 + SCALAR_REDUCTIONS)
        return c * N / p + t_opt * N / p + comm, comm

    rows = []
    for nd in nodes:
        W = nd * cores - 1
        per_half = W // 2
        groups = max(1, min(per_half, 4))
        p_group = max(1, per_half // groups)
        tasks = math.ceil(4 / groups)
        te_h, comm_h = t_eval(p_group)
        half = tasks * (ev_half / tasks_per_worker * te_h + map_per_task * scale)
        te_f, comm_f = t_eval(W)
        final = ev_final * te_f + final_rest * scale
        rows.append({"nodes": nd, "workers": W, "workers_per_weight_group": p_group,
                     "seconds_per_eval_half": round(te_h, 4), "seconds_per_eval_final": round(te_f, 4),
                     "allreduce_seconds_per_eval_final": round(comm_f, 4),
                     "half_sets_s": round(half), "final_s": round(final), "serial_s": round(serial * scale),
                     "total_s": round(half + final + serial * scale)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--operators", type=int, default=60, help="copies of the 7cth asymmetric unit (60: all)")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--workdir", default=os.environ.get("HPCREFINE_DATA") or os.path.expanduser("~/.cache/hpcrefine"))
    ap.add_argument("--shake", type=float, default=0.8)
    ap.add_argument("--macro-cycles", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--trial-iterations", type=int, default=20)
    ap.add_argument("--checkpoint-seconds", type=float, default=600.0)
    ap.add_argument("--max-step", type=float, default=None,
                    help="L-BFGS max_step (A, largest displacement of any atom in one line-search trial)")
    ap.add_argument("--decomposition", choices=("boxes", "blocks"), default=None,
                    help="how the workers share a minimisation (default: the program's, boxes)")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                    help="one more line of the parameter file, TOML (e.g. cycle_rotamers=false); repeatable")
    ap.add_argument("--sample", type=float, default=0.5, help="seconds between memory samples")
    ap.add_argument("--label", default="", help="suffix of the run folder")
    ap.add_argument("--ncs", default="off", choices=("off", "constraints", "restraints", "auto"),
                    help="refine's --ncs (default off)")
    ap.add_argument("--asu", action="store_true",
                    help="refine the asymmetric unit with the file's first --operators assembly operators "
                         "(needs --ncs constraints) against the same maps")
    ap.add_argument("--full-map", action="store_true",
                    help="refine against the full map alone (no half-set stage: every minimisation "
                         "shared by all the workers)")
    ap.add_argument("--prepare-only", action="store_true", help="build the model, maps and start only")
    ap.add_argument("--project", metavar="BENCH_JSON",
                    help="only print the projection to 1.44 M atoms on 1, 8, 64 nodes from a run's bench_scale.json")
    args = ap.parse_args(argv)
    if args.project:
        with open(args.project) as fh:
            res = json.load(fh)
        if "optimiser_seconds_per_evaluation" not in res:
            res["optimiser_seconds_per_evaluation"] = optimiser_seconds(res["atoms"])
            with open(args.project, "w") as fh:
                json.dump(res, fh, indent=1)
        print(f"measured at {res['atoms']:,} atoms: L-BFGS step {res['optimiser_seconds_per_evaluation']:.3f} s "
              "per evaluation on one process (the runs measured before the split optimiser ran it on every rank)")
        for row in project(res):
            print(json.dumps(row))
        return 0
    if args.asu and args.ncs != "constraints":
        ap.error("--asu needs --ncs constraints (the copies are made by the file's operators)")
    work = os.path.join(args.workdir, "bench_scale", f"{args.operators}ops")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    case = prepare(args, work)
    print(f"prepared {case['truth']}, maps {case['map']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    if args.prepare_only:
        return 0
    params = write_params(args, work)
    out_dir = os.path.join(work, f"run_n{args.ranks}{'_asu' if args.asu else ''}{args.label}")
    help_text = subprocess.run(hpcrefine_cmd("refine", "--help"), capture_output=True, text=True).stdout
    extra = ["--ncs", args.ncs] if "--ncs" in help_text else []
    mpiexec = shutil.which("mpiexec") or os.path.join(os.path.dirname(sys.executable), "mpiexec")
    maps = ["--map", os.path.join(os.path.dirname(case["half_maps"][0]), "full.mrc")] if args.full_map \
        else ["--half-maps", *case["half_maps"]]
    cmd = [mpiexec, "-n", str(args.ranks), *hpcrefine_cmd(
        "refine", case["start"], *maps, "--resolution", str(RESOLUTION),
        "--params", params, "--output", out_dir, "--overwrite", *extra)]
    print("running: " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
    wall, rc, mem = run_sampled(cmd, out_dir + ".log", args.sample, env=env)
    if rc != 0:
        print(f"refine failed (exit {rc}) after {wall:.0f} s; see {out_dir}.log; memory {json.dumps(mem)}")
        return 1
    res = summarise(args, case, out_dir, wall, mem, args.ranks)
    res["optimiser_seconds_per_evaluation"] = optimiser_seconds(res["atoms"])
    with open(os.path.join(out_dir, "bench_scale.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    print_result(res)
    print(f"wrote {os.path.join(out_dir, 'bench_scale.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
