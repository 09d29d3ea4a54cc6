"""validate_model: every validation figure of a model as one dict; the text summary; the files.

validate_model(model, xyz, restraints, map_grid, data, half_maps, resolution) is what `refine`
calls for its start and final models and what `hpcrefine validate` runs. It works on the flat
arrays of a Model and a Restraints (no MPI, no per-atom Python objects), and returns a dict whose
JSON-ready part (json_ready) is written as validation.json; per-residue arrays stay numpy arrays
under "per_residue" and are written as validation_residues.csv. Keys are documented in the
README ("Validation").
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import time

import numpy as np

from ..modelio import Model
from ..restraints import Restraints
from . import cbeta, clash, geometry, mapfit, ramachandran, rotamer
from .residues import residue_table

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def _round(x, n=4):
    if x is None:
        return None
    x = float(x)
    return round(x, n) if math.isfinite(x) else None


def validate_model(model: Model, xyz: np.ndarray, restraints: Restraints, map_grid=None,
                   data: np.ndarray | None = None, half_maps=None, resolution: float | None = None,
                   b: np.ndarray | None = None, occ: np.ndarray | None = None,
                   map_coefficients: np.ndarray | None = None, half_map_fsc=None,
                   with_refinement_cc: bool = False) -> dict:
    """All validation figures of the model at coordinates xyz (with B-factors b and occupancies
    occ in its model map when given, else the model's own).

    map_grid: a MapGrid giving the map's grid (origin, voxel) and, unless `data` is given, its
    values; data: the map to compare with (e.g. refine's FSC-weighted map), on map_grid's grid;
    half_maps: a pair of MapGrid (their mean is used when neither map_grid data nor data is
    given; their FSC is reported); resolution (A) is needed whenever there is a map.
    map_coefficients: the rfftn of the map compared with, when the caller has it (validating
    several models against one map); half_map_fsc: (s, FSC) of the half maps when already
    computed (simulate.fsc of the two). with_refinement_cc: the result also holds
    "refinement_cc_mask", the refinement's CC_mask of the model (mapfit.analyse), for the caller
    to take out before writing it.
    """
    t0 = time.perf_counter()
    timings = {}
    xyz = np.asarray(xyz, dtype=np.float64)
    names = tuple(sorted(set(rotamer.ATOM_NAMES) | set(cbeta.ATOM_NAMES) | set(ramachandran.BACKBONE)))
    table = residue_table(model, xyz, names)

    t = time.perf_counter()
    geo = geometry.analyse(model, xyz, restraints)
    timings["geometry"] = time.perf_counter() - t
    t = time.perf_counter()
    rama = ramachandran.analyse(table, xyz)
    rot = rotamer.analyse(table, xyz)
    cb = cbeta.analyse(table, xyz)
    timings["residues"] = time.perf_counter() - t
    t = time.perf_counter()
    cl = clash.analyse(model, xyz, restraints)
    timings["clashes"] = time.perf_counter() - t

    nres = model.n_residues
    per_res = {
        "chain": model.res_chain, "seqid": model.res_seqid, "resname": model.res_names,
        "rama_class": np.full(nres, -1, dtype=np.int8), "phi": np.full(nres, np.nan),
        "psi": np.full(nres, np.nan), "rama_score": np.full(nres, np.nan),
        "rama_category": np.full(nres, -1, dtype=np.int8),
        "rotamer_category": np.full(nres, -1, dtype=np.int8), "cbeta_deviation": np.full(nres, np.nan),
        "cc": np.full(nres, np.nan),
    }
    r = rama["residue"]
    per_res["rama_class"][r] = rama["cls"]
    per_res["phi"][r], per_res["psi"][r] = rama["phi"], rama["psi"]
    per_res["rama_score"][r], per_res["rama_category"][r] = rama["score"], rama["category"]
    per_res["rotamer_category"][rot["residue"]] = rot["category"]
    per_res["cbeta_deviation"][cb["residue"]] = cb["deviation"]

    def labels(res_idx):
        return [model.residue_label(int(i)) for i in res_idx]

    rama_out = rama["residue"][rama["category"] == ramachandran.OUTLIER]
    rot_out = rot["residue"][rot["category"] == rotamer.OUTLIER]
    cb_out = cb["residue"][cb["deviation"] >= cbeta.OUTLIER_CUTOFF]
    result = {
        "schema_version": SCHEMA_VERSION,
        "model": {"n_atoms": int(model.n_atoms), "n_residues": int(nres),
                  "n_chains": int(len(np.unique(model.res_chain))),
                  "n_amino_acids": int(table.is_amino.sum())},
        "resolution": _round(resolution, 3) if resolution else None,
        "geometry": geo,
        "ramachandran": {**ramachandran.summary(rama), "outlier_residues": labels(rama_out[:geometry.MAX_LISTED]),
                         "reference": "MolProbity Top8000 (cctbx-base rama8000_tables.h)"},
        "rotamers": {**rotamer.summary(rot), "outlier_residues": labels(rot_out[:geometry.MAX_LISTED]),
                     "reference": "Shapovalov & Dunbrack 2010, backbone-independent (chilife)"},
        "cbeta": {**cbeta.summary(cb), "outlier_cutoff": cbeta.OUTLIER_CUTOFF,
                  "outlier_residues": labels(cb_out[:geometry.MAX_LISTED])},
        "clashes": clash.summary(model, cl),
        "map": None,
        "per_residue": per_res,
    }

    exp = None
    if data is not None:
        exp = data
    elif map_grid is not None:
        exp = map_grid.data
    elif half_maps is not None:
        exp = (np.asarray(half_maps[0].data, dtype=np.float32) + np.asarray(half_maps[1].data, dtype=np.float32)) / 2
        map_grid = half_maps[0]
    if exp is not None:
        if not resolution or not resolution > 0:
            raise ValueError("validate_model needs a positive resolution with a map")
        t = time.perf_counter()
        fit = mapfit.analyse(model, xyz, exp, map_grid.origin, map_grid.voxel, resolution, b, occ,
                             map_coefficients, with_refinement_cc)
        if "refinement_cc_mask" in fit:
            result["refinement_cc_mask"] = fit["refinement_cc_mask"]
        timings["map_fit"] = time.perf_counter() - t
        per_res["cc"] = fit["residue_cc"]
        f = fit["fsc"]
        section = {
            "cc_mask": _round(fit["cc_mask"]), "cc_box": _round(fit["cc_box"]),
            "cc_volume": _round(fit["cc_volume"]), "cc_peaks": _round(fit["cc_peaks"]),
            "mask_voxels": fit["mask_voxels"],
            "fsc_avg": _round(f["fsc_avg"]), "d_fsc_05": _round(f["d_fsc_05"], 3),
            "fsc_curve": {"s": np.round(f["s"], 5).tolist(), "fsc": np.round(f["fsc"], 4).tolist()},
            "per_chain_cc": {str(c): _round(v) for c, v in zip(fit["chains"].tolist(), fit["chain_cc"].tolist())},
            "per_residue_cc_mean": _round(np.nanmean(fit["residue_cc"])) if np.isfinite(fit["residue_cc"]).any() else None,
            "per_residue_radius": fit["per_residue_radius"],
            "half_map_fsc": None,
        }
        if half_maps is not None:
            from ..simulate import fsc, fsc_crossing
            s, hf = half_map_fsc if half_map_fsc is not None else fsc(half_maps[0].data, half_maps[1].data,
                                                                      map_grid.voxel)
            section["half_map_fsc"] = {"s": np.round(s, 5).tolist(), "fsc": np.round(hf, 4).tolist(),
                                       "d_fsc_0143": _round(fsc_crossing(s, hf, 0.143), 3)}
        result["map"] = section
    timings["total"] = time.perf_counter() - t0
    result["timings"] = {k: round(v, 3) for k, v in timings.items()}
    return result


def json_ready(result: dict) -> dict:
    """The result without its per-residue numpy arrays (what validation.json holds)."""
    return {k: v for k, v in result.items() if k != "per_residue"}


def _pct(x):
    return "n/a" if x is None else f"{x:.2f}%"


def format_summary(result: dict) -> list[str]:
    """A readable summary, one line per figure group."""
    g, ra, ro, cb, cl = (result[k] for k in ("geometry", "ramachandran", "rotamers", "cbeta", "clashes"))
    m = result["model"]
    lines = [
        f"validation: {m['n_atoms']} atoms, {m['n_residues']} residues, {m['n_chains']} chains",
        f"  bonds      rmsd {g['bond_rmsd']:.4f} A   rmsZ {g['bond_rmsz']:.3f}   |Z|>4: {g['outliers'].get('bond', {}).get('count', 0)}",
        f"  angles     rmsd {g['angle_rmsd']:.3f} deg rmsZ {g['angle_rmsz']:.3f}   |Z|>4: {g['outliers'].get('angle', {}).get('count', 0)}",
        f"  torsions   rmsd {g['torsion_rmsd']:.2f} deg  chirality rmsd {g['chiral_rmsd']:.3f} A^3 "
        f"({g['chiral_inversions']} inverted)  planarity rmsd {g['planarity_rmsd']:.4f} A",
        f"  Ramachandran ({ra['n']} residues): favoured {_pct(ra['favoured_pct'])}, allowed "
        f"{_pct(ra['allowed_pct'])}, outliers {_pct(ra['outlier_pct'])} ({ra['outlier']})",
        f"  rotamers ({ro['n']}): outliers {_pct(ro['outlier_pct'])} ({ro['outlier']}), favoured {_pct(ro['favoured_pct'])}",
        f"  C-beta deviations >= {cb['outlier_cutoff']} A: {cb['outliers']} of {cb['n']}",
        f"  clashscore (heavy atoms, no H) {cl['clashscore']:.2f} ({cl['clashes']} overlaps >= {cl['overlap_cutoff']} A)",
    ]
    for kind in ("bond", "angle", "chirality"):
        listed = g["outliers"].get(kind, {}).get("listed", [])[:3]
        for o in listed:
            lines.append(f"    worst {kind}: {' '.join(o['atoms'])}  deviation {o['deviation']}  Z {o['z']}")
    if ra["outlier_residues"]:
        lines.append("    Ramachandran outliers: " + ", ".join(ra["outlier_residues"][:10])
                     + (" ..." if ra["outlier"] > 10 else ""))
    mp = result.get("map")
    if mp:
        lines.append(f"  map-model: CC_mask {mp['cc_mask']:.4f}  CC_box {mp['cc_box']:.4f}  CC_volume "
                     f"{mp['cc_volume']:.4f}  CC_peaks {mp['cc_peaks']:.4f}")
        d05 = "n/a" if mp["d_fsc_05"] is None else f"{mp['d_fsc_05']:.2f} A"
        lines.append(f"  map-model FSC: FSC_avg {mp['fsc_avg']:.4f} (to {result['resolution']} A), "
                     f"FSC=0.5 at {d05}")
        chain_cc = [v for v in mp["per_chain_cc"].values() if v is not None]
        if chain_cc:
            lines.append(f"  per-chain CC: {len(chain_cc)} chains, min {min(chain_cc):.3f}, median "
                         f"{float(np.median(chain_cc)):.3f}, max {max(chain_cc):.3f}")
        if mp.get("half_map_fsc"):
            lines.append(f"  half-map FSC=0.143 at {mp['half_map_fsc']['d_fsc_0143']} A")
    return lines


RAMA_CLASS_NAMES = ("general", "glycine", "cis_pro", "trans_pro", "pre_pro", "ile_val")
CATEGORY = {-1: "", 0: "outlier", 1: "allowed", 2: "favoured"}


def residues_csv(result: dict) -> str:
    """One line per residue: chain, seqid, resname, Ramachandran class/phi/psi/score/category,
    rotamer category, C-beta deviation, map CC. Made column by column (each a list of strings)
    and written by csv in one call: a row at a time took 1.0 s for 129,660 residues."""
    p = result["per_residue"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["chain", "seqid", "resname", "rama_class", "phi", "psi", "rama_score", "rama_category",
                "rotamer_category", "cbeta_deviation", "cc"])

    def num(x, fmt):
        x = np.asarray(x, dtype=np.float64)
        ok = np.isfinite(x).tolist()
        return [format(v, fmt) if good else "" for v, good in zip(x.tolist(), ok)]

    def names(codes, table):
        return [table[c] for c in np.asarray(codes).tolist()]

    classes = {k: v for k, v in enumerate(RAMA_CLASS_NAMES)}
    classes.update({c: "" for c in range(-128, 0)})
    w.writerows(zip(np.asarray(p["chain"]).tolist(), np.asarray(p["seqid"]).tolist(),
                    np.asarray(p["resname"]).tolist(), names(p["rama_class"], classes),
                    num(p["phi"], ".1f"), num(p["psi"], ".1f"), num(p["rama_score"], ".5f"),
                    names(p["rama_category"], CATEGORY), names(p["rotamer_category"], CATEGORY),
                    num(p["cbeta_deviation"], ".3f"), num(p["cc"], ".4f")))
    return buf.getvalue()


def write_outputs(result: dict, outdir: str, prefix: str = "validation") -> list[str]:
    """Write {prefix}.json, {prefix}_residues.csv and the PNG plots into outdir; returns the paths."""
    import os

    from ..modelio import atomic_write_text
    from . import plots

    os.makedirs(outdir, exist_ok=True)
    paths = [os.path.join(outdir, f"{prefix}.json"), os.path.join(outdir, f"{prefix}_residues.csv")]
    atomic_write_text(paths[0], json.dumps(json_ready(result), indent=1) + "\n")
    atomic_write_text(paths[1], residues_csv(result))
    paths += plots.write_plots(result, outdir, prefix)
    return paths
