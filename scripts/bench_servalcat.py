#!/usr/bin/env python3
"""Benchmark servalcat's real-space refinement against a known true model.

Runs ``servalcat refine_spa_norefmac`` on a start model and half maps (or one full map) as a child
process, measures its wall time and peak memory, finds the refined model it writes, and scores that
model against the true model: all-atom and C-alpha RMSD, with atoms matched by chain, residue number
(and insertion code) and atom name, hydrogens ignored, no superposition (refinement keeps the map's
frame, so any offset is a real error). servalcat's own bond/angle rmsd from its final summary is
recorded too, and, when hpcrefine's geometry statistics can be imported, the geometry of the start
and refined models measured with hpcrefine's yardstick so the two programs are compared on one scale.

servalcat lives in its own virtual environment; point ``--servalcat`` at that environment's python
or at its ``servalcat`` executable. It needs a CCP4-format monomer library (``--monlib``, exported to
it as CLIBD_MON).

Example:
    python scripts/bench_servalcat.py --start start.pdb --truth truth.pdb \\
        --half-maps half1.mrc half2.mrc --resolution 3.5 --outdir out/servalcat \\
        --servalcat /work/servalcat-venv/bin/python --monlib /path/to/monomers

Prints the result as JSON and writes it to OUTDIR/bench_servalcat.json. Exits non-zero if servalcat
fails.

servalcat decides which residues are bonded by distance (a peptide C-N longer than 1.5 x 1.341 A is a
chain break), so on a badly perturbed start it drops peptide restraints and pushes the broken ends
apart with non-bonded repulsion. ``--sequence-links`` adds the missing peptide / phosphodiester links
to a copy of the start model as explicit links, so servalcat restrains the chain by sequence, as
hpcrefine does.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

import gemmi
import numpy as np

RESULT_NAME = "bench_servalcat.json"
LOG_NAME = "servalcat_stdout.log"

# Distances above which gemmi (and so servalcat) treats consecutive residues as not connected.
_PEPTIDE_CN_MAX = 1.5 * 1.341
_NUCLEIC_O3P_MAX = 1.5 * 1.6


# --------------------------------------------------------------------------------------------
# Scoring against the truth
# --------------------------------------------------------------------------------------------

def _hpcrefine():
    """Make the repository's hpcrefine importable (the script runs from a checkout)."""
    repo_root = str(Path(__file__).resolve().parents[1])
    if repo_root not in sys.path:
        sys.path.append(repo_root)


def rmsd_to_truth(model_path: str | os.PathLike, truth_path: str | os.PathLike) -> dict:
    """RMSD of a model to the true model, in place (no superposition), hydrogens ignored, with
    hpcrefine's own matching (chain, residue number and insertion code, atom name, altloc):
    ``rmsd_all`` and ``rmsd_ca`` (A), the largest deviation ``max_dev`` and its atom, counts."""
    _hpcrefine()
    from hpcrefine.compare import rmsd

    r = rmsd(str(model_path), str(truth_path))
    if r["matched_atoms"] == 0:
        raise ValueError(f"no atoms of {model_path} match {truth_path} by chain/residue/atom name")
    return {"rmsd_all": r["rmsd_all"], "rmsd_ca": r["rmsd_ca"], "max_dev": r["max_deviation"],
            "max_dev_atom": r["max_deviation_atom"], "n_truth": r["truth_atoms"],
            "n_matched": r["matched_atoms"], "n_ca": r["ca_atoms"]}


def same_yardstick_geometry(model_path: str | os.PathLike) -> dict | None:
    """Geometry measured by hpcrefine's own restraints (hpcrefine.compare.model_geometry), so that
    both programs are judged with one yardstick; None when hpcrefine is not importable."""
    _hpcrefine()
    try:
        from hpcrefine.compare import model_geometry
    except ImportError:
        return None
    try:
        return _jsonable(model_geometry(str(model_path)))
    except Exception as exc:  # a benchmark keeps its servalcat numbers regardless
        return {"error": f"{type(exc).__name__}: {exc}"}


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


# --------------------------------------------------------------------------------------------
# Preparing the start model
# --------------------------------------------------------------------------------------------

def add_sequence_links(model_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Write a copy of a model with explicit links wherever servalcat would see a chain break.

    For consecutive residues of one chain (residue numbers differing by one, or equal with
    insertion codes) whose peptide C-N or nucleic-acid O3'-P distance is too long for gemmi to call
    them connected, a covalent connection is added with the monomer-library link id (TRANS, PTRANS,
    CIS, PCIS by the current omega; p for nucleic acids). Written as mmCIF (struct_conn carries the
    link id). Returns the number of links added.
    """
    st = gemmi.read_structure(str(model_path))
    st.setup_entities()
    added = 0
    for chain in st[0]:
        for i in range(len(chain) - 1):
            r1, r2 = chain[i], chain[i + 1]
            if r2.seqid.num - r1.seqid.num > 1 or r2.seqid.num < r1.seqid.num:
                continue  # numbering gap: a real break
            info1 = gemmi.find_tabulated_residue(r1.name)
            info2 = gemmi.find_tabulated_residue(r2.name)
            if not (info1 and info2):
                continue
            if info1.is_amino_acid() and info2.is_amino_acid():
                a1, a2 = r1.find_atom("C", "*"), r2.find_atom("N", "*")
                if a1 is None or a2 is None or a1.pos.dist(a2.pos) <= _PEPTIDE_CN_MAX:
                    continue
                omega = gemmi.calculate_omega(r1, r2)
                cis = not math.isnan(omega) and abs(omega) < math.pi / 2
                link_id = ("PCIS" if cis else "PTRANS") if r2.name == "PRO" else ("CIS" if cis else "TRANS")
            elif info1.is_nucleic_acid() and info2.is_nucleic_acid():
                a1, a2 = r1.find_atom("O3'", "*"), r2.find_atom("P", "*")
                if a1 is None or a2 is None or a1.pos.dist(a2.pos) <= _NUCLEIC_O3P_MAX:
                    continue
                link_id = "p"
            else:
                continue
            con = gemmi.Connection()
            added += 1
            con.name = f"seqlink{added}"
            con.type = gemmi.ConnectionType.Covale
            con.link_id = link_id
            con.partner1 = gemmi.make_address(chain, r1, a1)
            con.partner2 = gemmi.make_address(chain, r2, a2)
            st.connections.append(con)
    st.make_mmcif_document().write_file(str(out_path))
    return added


# --------------------------------------------------------------------------------------------
# Running servalcat
# --------------------------------------------------------------------------------------------

def servalcat_command(servalcat: str | os.PathLike) -> list[str]:
    """The argv prefix that starts servalcat, given its python interpreter or its executable."""
    path = Path(servalcat)
    if path.name.startswith("python"):
        return [str(path), "-m", "servalcat"]
    return [str(path)]


def parse_servalcat_log(text: str) -> dict:
    """Pick servalcat's own figures out of its output: final geometry, FSCaverage, weight, gaps."""
    out: dict = {"bond_rmsd": None, "angle_rmsd": None, "fsc_average": None, "weight": None}
    summary = text[text.rfind("Final Summary"):] if "Final Summary" in text else ""
    patterns = {
        "bond_rmsd": r"bond lengths:\s*([-\d.eE+]+)",
        "angle_rmsd": r"bond\s+angles:\s*([-\d.eE+]+)",
        "fsc_average": r"FSCaverage\(full\)\s*=\s*([-\d.eE+]+)",
        "weight": r"Weight used:\s*([-\d.eE+]+)",
    }
    for key, pat in patterns.items():
        m = re.search(pat, summary)
        if m:
            out[key] = float(m.group(1))
    m = re.search(r"Servalcat ver\.\s*(\S+)", text)
    out["version"] = m.group(1) if m else None
    # chain breaks servalcat found when building restraints (only the first topology counts)
    first = text.split("Creating restraints", 1)
    block = first[1].split("Geometry weights", 1)[0] if len(first) > 1 else ""
    out["gaps_reported"] = len(re.findall(r"^\s*gap between", block, flags=re.M))
    return out


def _final_geometry_from_stats(stats_path: Path) -> dict:
    """Bond/angle rmsd of the last cycle from servalcat's PREFIX_stats.json, if present."""
    try:
        cycles = json.loads(stats_path.read_text())
        rmsd = cycles[-1]["geom"]["summary"]["r.m.s.d."]
        return {"bond_rmsd": rmsd.get("Bond distances, non H"),
                "angle_rmsd": rmsd.get("Bond angles, non H")}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return {}


def find_refined_model(outdir: Path, prefix: str) -> Path | None:
    """servalcat writes PREFIX.mmcif (always) and PREFIX.pdb (when the model fits the format)."""
    for suffix in (".mmcif", ".cif", ".pdb"):
        p = outdir / f"{prefix}{suffix}"
        if p.is_file():
            return p
    return None


def run_servalcat(start: str | os.PathLike,
                  truth: str | os.PathLike | None,
                  resolution: float,
                  outdir: str | os.PathLike,
                  servalcat: str | os.PathLike,
                  monlib: str | os.PathLike,
                  half_maps: tuple[str, str] | None = None,
                  full_map: str | None = None,
                  cycles: int | None = None,
                  weight: float | None = None,
                  prefix: str = "refined",
                  sequence_links: bool = False,
                  extra_args: list[str] | None = None) -> dict:
    """Run servalcat refine_spa_norefmac once and return what it did and how well.

    Exactly one of ``half_maps`` and ``full_map`` is given. The refinement runs in ``outdir``
    (created) with hydrogens removed (``--hydrogen no``) and servalcat's automatic weight unless
    ``weight`` is given. Wall time covers the whole child process; peak RSS is that child's
    ``ru_maxrss`` (from wait4, the same accounting getrusage(RUSAGE_CHILDREN) reports).
    """
    if (half_maps is None) == (full_map is None):
        raise ValueError("give either half_maps or full_map")
    outdir = Path(outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    monlib = Path(monlib).resolve()
    for needed in (monlib / "list" / "mon_lib_list.cif", monlib / "ener_lib.cif"):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} not found: --monlib must be a CCP4 monomer library")

    start = Path(start).resolve()
    model_in = start
    links_added = 0
    if sequence_links:
        model_in = outdir / "start_with_links.cif"
        links_added = add_sequence_links(start, model_in)

    cmd = servalcat_command(servalcat) + ["refine_spa_norefmac", "--model", str(model_in)]
    if half_maps is not None:
        cmd += ["--halfmaps", str(Path(half_maps[0]).resolve()), str(Path(half_maps[1]).resolve())]
    else:
        cmd += ["--map", str(Path(full_map).resolve())]
    cmd += ["-d", f"{resolution:g}", "--hydrogen", "no", "--monlib", str(monlib), "-o", prefix]
    if cycles is not None:
        cmd += ["--ncycle", str(cycles)]
    if weight is not None:
        cmd += ["--weight", f"{weight:g}"]
    cmd += list(extra_args or [])

    env = dict(os.environ, CLIBD_MON=str(monlib))
    log_path = outdir / LOG_NAME
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=outdir, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    # largest of all children reaped so far: equals the above unless an earlier child was bigger
    children_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss

    text = log_path.read_text(errors="replace")
    reported = parse_servalcat_log(text)
    refined = find_refined_model(outdir, prefix)
    if reported["bond_rmsd"] is None and refined is not None:
        reported.update({k: v for k, v in
                         _final_geometry_from_stats(outdir / f"{prefix}_stats.json").items()
                         if v is not None})

    result = {
        "program": "servalcat refine_spa_norefmac",
        "servalcat_version": reported.pop("version"),
        "command": shlex.join(cmd),
        "returncode": proc.returncode,
        "wall_time_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024.0, 1),  # Linux reports KiB
        "peak_rss_children_mb": round(children_peak / 1024.0, 1),
        "log": str(log_path),
        "start_model": str(start),
        "sequence_links_added": links_added if sequence_links else None,
        "refined_model": str(refined) if refined else None,
        "servalcat_reported": reported,
    }
    if proc.returncode != 0 or refined is None:
        result["error"] = "servalcat failed: " + " | ".join(text.strip().splitlines()[-5:])
        return result

    if truth is not None:
        result["rmsd_to_truth"] = rmsd_to_truth(refined, truth)
        result["start_rmsd_to_truth"] = rmsd_to_truth(start, truth)
    yardstick_refined = same_yardstick_geometry(refined)
    result["same_yardstick_geometry"] = None if yardstick_refined is None else {
        "start": same_yardstick_geometry(start),
        "refined": yardstick_refined,
    }
    return result


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--start", required=True, help="start model (PDB or mmCIF)")
    p.add_argument("--truth", help="true model to score against (PDB or mmCIF)")
    maps = p.add_mutually_exclusive_group(required=True)
    maps.add_argument("--half-maps", nargs=2, metavar=("H1", "H2"), help="half maps (MRC/CCP4)")
    maps.add_argument("--map", help="full map, when there are no half maps")
    p.add_argument("--resolution", "-d", type=float, required=True, help="resolution (A)")
    p.add_argument("--outdir", required=True, help="directory for servalcat's outputs and the JSON")
    p.add_argument("--servalcat", "--servalcat-python", dest="servalcat", required=True,
                   help="python of servalcat's environment, or the servalcat executable")
    p.add_argument("--monlib", required=True, help="monomer library directory (becomes CLIBD_MON)")
    p.add_argument("--cycles", type=int, help="refinement cycles (servalcat --ncycle; default 10)")
    p.add_argument("--weight", type=float, help="fixed data weight (default: servalcat's automatic)")
    p.add_argument("--prefix", default="refined", help="servalcat output prefix")
    p.add_argument("--sequence-links", action="store_true",
                   help="add explicit links where servalcat would see chain breaks in the start")
    p.add_argument("--extra-args", default="",
                   help="further servalcat options as one string; write it with '=' when it starts "
                        "with a dash: --extra-args='--jellybody --ncsr'")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result = run_servalcat(
        start=args.start, truth=args.truth, resolution=args.resolution, outdir=args.outdir,
        servalcat=args.servalcat, monlib=args.monlib,
        half_maps=tuple(args.half_maps) if args.half_maps else None, full_map=args.map,
        cycles=args.cycles, weight=args.weight, prefix=args.prefix,
        sequence_links=args.sequence_links, extra_args=shlex.split(args.extra_args))
    text = json.dumps(result, indent=2)
    out = Path(args.outdir) / RESULT_NAME
    tmp = out.with_name(out.name + ".part")
    tmp.write_text(text + "\n")
    os.replace(tmp, out)
    print(text)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
