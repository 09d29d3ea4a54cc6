#!/usr/bin/env python
"""Time `hpcrefine validate` on the 60-copy dengue virus assembly of 7cth (1,000,020 atoms).

    python scripts/bench_validate.py [--workdir DIR] [--map] [--resolution 4.0]

Builds the biological assembly from the mmCIF's pdbx_struct_assembly / pdbx_struct_oper_list with
gemmi (600 chains; chain names are made unique by gemmi's AddNumber naming), caches it as
assembly_7cth.cif under --workdir (default $HPCREFINE_DATA or ~/.cache/hpcrefine; never in the
repository), and runs `hpcrefine validate` on it in a child process, model only and (with --map)
against a simulated map of the assembly (written once to the work directory). For each run it
prints the wall time and the child's peak resident memory (ru_maxrss), and the validation
timings that the report records.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import gemmi

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)


def build_assembly(workdir: str) -> str:
    from hpcrefine import datasets

    path = os.path.join(workdir, "assembly_7cth.cif")
    if os.path.exists(path):
        return path
    src = datasets.fetch(["7cth"])["7cth"]
    st = gemmi.read_structure(src)
    st.setup_entities()
    st.remove_hydrogens()
    assembly = gemmi.make_assembly(st.assemblies[0], st[0], gemmi.HowToNameCopiedChain.AddNumber)
    out = gemmi.Structure()
    out.name = "7cth_assembly"
    out.cell = gemmi.UnitCell()
    out.add_model(assembly)
    out.setup_entities()
    out.make_mmcif_document().write_file(path + ".part")
    os.replace(path + ".part", path)
    return path


PEAK_TAG = "peak-rss-kb:"


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall time, the child's own peak RSS (MB) and exit code of one run."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    peak = [line for line in proc.stderr.splitlines() if line.startswith(PEAK_TAG)]
    peak_mb = float(peak[-1].split(":")[1]) / 1024.0 if peak else float("nan")
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
    return wall, peak_mb, proc.returncode


def child(args: list[str]) -> list[str]:
    """The hpcrefine command in its own interpreter, which reports its own peak RSS at exit."""
    code = ("import resource, sys\nfrom hpcrefine.cli import main\nrc = main(sys.argv[1:])\n"
            f"print('{PEAK_TAG}', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
            "sys.exit(rc)")
    return [sys.executable, "-c", code, *args]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default=os.environ.get("HPCREFINE_DATA") or os.path.expanduser("~/.cache/hpcrefine"))
    ap.add_argument("--map", action="store_true", help="also validate against a simulated map")
    ap.add_argument("--resolution", type=float, default=4.0)
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.perf_counter()
    model = build_assembly(args.workdir)
    print(f"assembly: {model} ({time.perf_counter() - t0:.1f} s to build or find)")
    runs = [("model only", [model, "--output", os.path.join(args.workdir, "bench_validate_model"), "--overwrite"])]
    if args.map:
        maps = os.path.join(args.workdir, f"assembly_7cth_maps_{args.resolution:g}")
        if not os.path.exists(os.path.join(maps, "full.mrc")):
            t = time.perf_counter()
            subprocess.run(child(["simulate", model, "--resolution", str(args.resolution), "--output", maps]),
                           check=True, stdout=subprocess.DEVNULL)
            print(f"simulated {args.resolution} A map in {time.perf_counter() - t:.0f} s")
        runs.append((f"with a {args.resolution:g} A map",
                     [model, "--map", os.path.join(maps, "full.mrc"), "--resolution", str(args.resolution),
                      "--output", os.path.join(args.workdir, "bench_validate_map"), "--overwrite"]))
    for label, a in runs:
        wall, peak, rc = run(child(["validate", *a]))
        out = a[a.index("--output") + 1]
        timings = {}
        if rc == 0:
            with open(os.path.join(out, "validation.json")) as fh:
                doc = json.load(fh)
            timings = doc["timings"]
            print(f"{label}: {doc['model']['n_atoms']} atoms, {doc['model']['n_chains']} chains")
        print(f"{label}: wall {wall:.1f} s, peak RSS {peak:.0f} MB, exit {rc}, "
              f"validation timings {timings}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
