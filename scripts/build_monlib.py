#!/usr/bin/env python3
"""Build the monomer library that hpcrefine ships (hpcrefine/data/monomers).

Source: the CCP4/REFMAC monomer library 5.41 (G. Murshudov et al.), as installed by Debian's
refmac-dictionary package in /usr/share/refmac/monomers (LGPL-3). For each residue type that
hpcrefine needs out of the box, the file <letter>/<CODE>.cif is read, known defects of the Debian
copy are repaired, every file is validated, and a reduced copy holding only the categories that
hpcrefine reads is written to hpcrefine/data/monomers/<letter>/<CODE>.cif.

Usage:
    python scripts/build_monlib.py [--source DIR] [--dest DIR] [--extra CODE ...]

The source defaults to $HPCREFINE_REFMAC_DICT, else /usr/share/refmac/monomers. The script stops
with a non-zero exit on any monomer that is missing or fails validation, so a defect in a future
source version is reported instead of being shipped.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gemmi

log = logging.getLogger("build_monlib")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = os.environ.get("HPCREFINE_REFMAC_DICT", "/usr/share/refmac/monomers")
DEFAULT_DEST = REPO / "hpcrefine" / "data" / "monomers"
LICENCE_DIR = Path("/usr/share/common-licenses")
SOURCE_VERSION = "5.41"

AMINO_ACIDS = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE",
               "LEU", "LYS", "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL"]
MODIFIED_AMINO_ACIDS = ["MSE", "SEP", "TPO", "PTR"]
NUCLEOTIDES = ["A", "C", "G", "U", "DA", "DC", "DG", "DT"]
MODIFIED_NUCLEOTIDES = ["PSU", "5MC", "OMG", "2MG", "1MA", "7MG", "H2U"]
WATER_AND_IONS = ["HOH", "MG", "ZN", "CA", "NA", "CL", "K", "MN", "FE", "FE2", "CU", "CO", "NI",
                  "CD", "IOD", "BR", "SO4", "PO4", "NO3"]
LIGANDS = ["NAG", "MAN", "BMA", "FUC", "GLC", "BGC", "GAL", "AMP", "ADP", "ATP", "GDP", "GTP",
           "NAD", "FAD", "GOL", "EDO", "ACT", "PEG", "FMT", "DMS"]
CODES = AMINO_ACIDS + MODIFIED_AMINO_ACIDS + NUCLEOTIDES + MODIFIED_NUCLEOTIDES + WATER_AND_IONS + LIGANDS

# The categories hpcrefine reads; everything else (tree, descriptors, coordinates...) is dropped.
KEPT_CATEGORIES = ["_chem_comp.", "_chem_comp_atom.", "_chem_comp_bond.", "_chem_comp_angle.",
                   "_chem_comp_tor.", "_chem_comp_chir.", "_chem_comp_plane_atom."]

BOND_TYPES = ("single", "double", "triple", "aromatic", "deloc", "metal", "coval")
CHIRAL_SIGNS = ("positiv", "negativ", "both")

# Engh & Huber (1991) heavy-atom geometry of the two side chains whose Debian files carry defects,
# used to check that the numbers in those files are sound: (atoms) -> (target, sigma).
ENGH_HUBER = {
    "TRP": {
        ("CB", "CG"): (1.498, 0.031), ("CG", "CD1"): (1.365, 0.025), ("CG", "CD2"): (1.433, 0.018),
        ("CD1", "NE1"): (1.374, 0.021), ("NE1", "CE2"): (1.370, 0.011), ("CD2", "CE2"): (1.409, 0.017),
        ("CD2", "CE3"): (1.398, 0.016), ("CE2", "CZ2"): (1.394, 0.021), ("CE3", "CZ3"): (1.382, 0.030),
        ("CZ2", "CH2"): (1.368, 0.019), ("CZ3", "CH2"): (1.400, 0.025),
        ("CA", "CB", "CG"): (113.6, 1.9), ("CB", "CG", "CD1"): (126.9, 1.5),
        ("CB", "CG", "CD2"): (126.8, 1.4), ("CD1", "CG", "CD2"): (106.3, 1.6),
        ("CG", "CD1", "NE1"): (110.2, 1.3), ("CD1", "NE1", "CE2"): (108.9, 1.8),
        ("NE1", "CE2", "CD2"): (107.4, 1.3), ("CE2", "CD2", "CG"): (107.2, 1.2),
        ("NE1", "CE2", "CZ2"): (130.1, 1.5), ("CE3", "CD2", "CE2"): (118.8, 1.0),
        ("CD2", "CE2", "CZ2"): (122.4, 1.0), ("CD2", "CE3", "CZ3"): (118.6, 1.3),
        ("CE3", "CZ3", "CH2"): (121.1, 1.3), ("CZ3", "CH2", "CZ2"): (121.5, 1.3),
        ("CH2", "CZ2", "CE2"): (117.5, 1.3),
    },
    "HIS": {
        ("CB", "CG"): (1.497, 0.014), ("CG", "ND1"): (1.378, 0.011), ("CG", "CD2"): (1.354, 0.011),
        ("ND1", "CE1"): (1.321, 0.010), ("CE1", "NE2"): (1.321, 0.010), ("NE2", "CD2"): (1.374, 0.011),
        ("CA", "CB", "CG"): (113.8, 1.0), ("CB", "CG", "ND1"): (122.7, 1.5),
        ("CB", "CG", "CD2"): (131.2, 1.3), ("ND1", "CG", "CD2"): (106.1, 1.0),
        ("CG", "ND1", "CE1"): (109.3, 1.7), ("ND1", "CE1", "NE2"): (108.4, 1.0),
        ("CE1", "NE2", "CD2"): (109.0, 1.0), ("NE2", "CD2", "CG"): (107.2, 1.0),
    },
}
BACKBONE_ENGH_HUBER = {
    ("N", "CA"): (1.458, 0.019), ("CA", "C"): (1.525, 0.021), ("C", "O"): (1.231, 0.020),
    ("CA", "CB"): (1.530, 0.020), ("N", "CA", "C"): (111.2, 2.8), ("N", "CA", "CB"): (110.5, 1.7),
    ("CB", "CA", "C"): (110.1, 1.9), ("CA", "C", "O"): (120.8, 1.7),
}


class BuildError(Exception):
    pass


@dataclass
class TextFix:
    """A repair applied to the text of one source file; `needed` tells whether it applies."""
    code: str
    description: str
    needed: Callable[[str], bool]
    apply: Callable[[str], str]


def _leading_junk(text: str) -> str:
    """Text before the first line that a CIF file may start with ('#', data_, global_)."""
    m = re.search(r"^(#|data_|global_)", text, flags=re.MULTILINE)
    return text[:m.start()] if m else ""


TEXT_FIXES = [
    TextFix("HIS", "removed stray characters 'f' before the first comment line (the file did not parse "
            "as CIF: 'expected block header')",
            needed=lambda t: _leading_junk(t).strip() != "",
            apply=lambda t: t[len(_leading_junk(t)):]),
    TextFix("TRP", "bond CD1-NE1: bond type 'sinlge' corrected to 'single'",
            needed=lambda t: re.search(r"\bsinlge\b", t) is not None,
            apply=lambda t: re.sub(r"\bsinlge\b", "single", t)),
]


def _is_hydrogen(element: str) -> bool:
    return element.upper() in ("H", "D")


def source_path(source: Path, code: str) -> Path:
    return source / code[0].lower() / f"{code}.cif"


def read_source(source: Path, code: str) -> tuple[str, list[str]]:
    """Text of one source file with the known repairs applied; the repairs made."""
    path = source_path(source, code)
    if not path.is_file():
        raise BuildError(f"{code}: {path} not found in the source library")
    text = path.read_text()
    fixes = []
    for fix in TEXT_FIXES:
        if fix.code == code and fix.needed(text):
            text = fix.apply(text)
            fixes.append(fix.description)
    junk = _leading_junk(text)
    if junk.strip():
        raise BuildError(f"{code}: unexpected text before the first data block: {junk.strip()[:40]!r}")
    return text, fixes


def _table(block: gemmi.cif.Block, prefix: str, tags: list[str]):
    return block.find(prefix, tags)


def validate(code: str, doc: gemmi.cif.Document) -> None:
    """Fail on anything the topology code would misread."""
    block = doc.find_block(f"comp_{code}")
    if block is None:
        raise BuildError(f"{code}: no data_comp_{code} block")
    atoms = {}
    for row in _table(block, "_chem_comp_atom.", ["atom_id", "type_symbol", "type_energy"]):
        name = row.str(0)
        if name in atoms:
            raise BuildError(f"{code}: atom {name} listed twice")
        atoms[name] = row.str(1)
    if not atoms:
        raise BuildError(f"{code}: no atoms")

    def known(names, what):
        for n in names:
            if n not in atoms:
                raise BuildError(f"{code}: {what} names atom {n!r}, which is not in _chem_comp_atom")

    for row in _table(block, "_chem_comp_bond.", ["atom_id_1", "atom_id_2", "type", "value_dist",
                                                  "value_dist_esd"]):
        known([row.str(0), row.str(1)], "bond")
        btype = row.str(2).lower()
        if not any(t.startswith(btype[:4]) for t in BOND_TYPES):
            raise BuildError(f"{code}: bond {row.str(0)}-{row.str(1)} has unknown type {btype!r}")
        d, s = float(row[3]), float(row[4])
        heavy = not (_is_hydrogen(atoms[row.str(0)]) or _is_hydrogen(atoms[row.str(1)]))
        if not (0.7 < d < 3.0) or not (0.0 < s <= 0.2) or (heavy and d < 1.0):
            raise BuildError(f"{code}: bond {row.str(0)}-{row.str(1)} {d} ({s}) out of range")
    for row in _table(block, "_chem_comp_angle.", ["atom_id_1", "atom_id_2", "atom_id_3",
                                                   "value_angle", "value_angle_esd"]):
        known([row.str(0), row.str(1), row.str(2)], "angle")
        a, s = float(row[3]), float(row[4])
        if not (50.0 < a <= 180.0) or not (0.0 < s <= 20.0):
            raise BuildError(f"{code}: angle {row.str(0)}-{row.str(1)}-{row.str(2)} {a} ({s}) out of range")
    for row in _table(block, "_chem_comp_tor.", ["atom_id_1", "atom_id_2", "atom_id_3", "atom_id_4",
                                                 "value_angle", "value_angle_esd", "period"]):
        known([row.str(i) for i in range(4)], "torsion")
        float(row[4]), float(row[5]), int(row[6])
    for row in _table(block, "_chem_comp_chir.", ["atom_id_centre", "atom_id_1", "atom_id_2",
                                                  "atom_id_3", "volume_sign"]):
        known([row.str(i) for i in range(4)], "chirality")
        if not any(row.str(4).lower().startswith(s[:3]) for s in CHIRAL_SIGNS):
            raise BuildError(f"{code}: chiral centre {row.str(0)} has unknown sign {row.str(4)!r}")
    for row in _table(block, "_chem_comp_plane_atom.", ["plane_id", "atom_id", "dist_esd"]):
        known([row.str(1)], "plane")
        float(row[2])


def check_engh_huber(code: str, doc: gemmi.cif.Document) -> list[str]:
    """Compare heavy-atom targets with Engh & Huber (1991); returns the disagreements."""
    if code not in ENGH_HUBER:
        return []
    block = doc.find_block(f"comp_{code}")
    values = {}
    for row in block.find("_chem_comp_bond.", ["atom_id_1", "atom_id_2", "value_dist", "value_dist_esd"]):
        values[frozenset((row.str(0), row.str(1)))] = (float(row[2]), float(row[3]))
    for row in block.find("_chem_comp_angle.", ["atom_id_1", "atom_id_2", "atom_id_3",
                                                "value_angle", "value_angle_esd"]):
        values[(row.str(1), frozenset((row.str(0), row.str(2))))] = (float(row[3]), float(row[4]))
    problems = []
    for atoms, (target, sigma) in {**BACKBONE_ENGH_HUBER, **ENGH_HUBER[code]}.items():
        key = frozenset(atoms) if len(atoms) == 2 else (atoms[1], frozenset((atoms[0], atoms[2])))
        if key not in values:
            problems.append(f"{'-'.join(atoms)} missing")
            continue
        v, s = values[key]
        tol = 0.002 if len(atoms) == 2 else 0.15
        if abs(v - target) > tol:
            problems.append(f"{'-'.join(atoms)} = {v} (Engh & Huber {target})")
    return problems


def reduced_document(code: str, doc: gemmi.cif.Document) -> gemmi.cif.Document:
    """A new document with data_comp_list (this monomer's chem_comp row) and the kept categories."""
    out = gemmi.cif.Document()
    src_list = doc.find_block("comp_list")
    src = doc.find_block(f"comp_{code}")
    lst = out.add_new_block("comp_list")
    if src_list is not None:
        table = src_list.find_mmcif_category("_chem_comp.")
        tags = [t.split(".", 1)[1] for t in table.tags]
        loop = lst.init_mmcif_loop("_chem_comp.", tags)
        for row in table:
            if row.str(0) == code:
                loop.add_row([row[i] for i in range(len(tags))])
    blk = out.add_new_block(f"comp_{code}")
    for cat in KEPT_CATEGORIES[1:]:
        table = src.find_mmcif_category(cat)
        if len(table) == 0:
            continue
        tags = [t.split(".", 1)[1] for t in table.tags]
        loop = blk.init_mmcif_loop(cat, tags)
        for row in table:
            loop.add_row([row[i] for i in range(len(tags))])
    return out


HEADER = """\
# {code}: from the CCP4/REFMAC monomer library {version} (G. Murshudov et al.), as packaged in
# Debian's refmac-dictionary; licence LGPL-3 (see ../COPYING). Reduced to the categories hpcrefine
# reads by scripts/build_monlib.py (see ../README.txt).{fixed}
"""


def write_monomer(dest: Path, code: str, doc: gemmi.cif.Document, fixes: list[str]) -> Path:
    out = dest / code[0].lower() / f"{code}.cif"
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = gemmi.cif.WriteOptions()
    opts.align_loops = 30
    fixed = "".join(f"\n# Repaired: {f}." for f in fixes)
    out.write_text(HEADER.format(code=code, version=SOURCE_VERSION, fixed=fixed) + doc.as_string(opts))
    return out


README = """\
hpcrefine bundled monomer library
=================================

Source
  The files in the one-letter directories (a/ALA.cif, ...) come from the CCP4/REFMAC monomer
  library, version {version}, by G. Murshudov et al. (MRC Laboratory of Molecular Biology), as
  packaged by Debian in refmac-dictionary ({version}), installed at /usr/share/refmac/monomers.

Licence
  GNU Lesser General Public License version 3 (LGPL-3), see COPYING here; the LGPL-3 supplements
  the GNU General Public License version 3, whose text is in COPYING.GPL-3. The rest of hpcrefine
  is under its own licence (see the project's pyproject.toml).

What was changed
  - Only the monomers hpcrefine needs out of the box are included ({n} residue types).
  - Each file keeps only the categories hpcrefine reads: chem_comp, chem_comp_atom,
    chem_comp_bond, chem_comp_angle, chem_comp_tor, chem_comp_chir, chem_comp_plane_atom
    (chem_comp_tree, the global_ header block and comments are dropped; values are unchanged).
  - Repairs of defects in the Debian copy:
{fixes}
  - Every file is checked (known atom names in every restraint, bond types, chirality signs,
    ranges of values) and the TRP and HIS heavy-atom targets are compared with Engh & Huber (1991).

Not from the CCP4 library
  list/links.cif (links between residues and terminal modifications) and list/energy_types.cif
  (non-bonded radii and hydrogen-bond roles) are hpcrefine's own tables, written for it; their
  comments give their sources (Engh & Huber 1991; Parkinson et al. 1996).

Regenerate with:  python scripts/build_monlib.py
"""


def build(source: Path, dest: Path, codes: list[str]) -> dict[str, list[str]]:
    if not source.is_dir():
        raise BuildError(f"source library {source} not found (install Debian's refmac-dictionary "
                         f"or pass --source)")
    all_fixes: dict[str, list[str]] = {}
    for code in codes:
        text, fixes = read_source(source, code)
        try:
            doc = gemmi.cif.read_string(text)
        except Exception as exc:
            raise BuildError(f"{code}: does not parse as CIF: {exc}") from None
        validate(code, doc)
        problems = check_engh_huber(code, doc)
        if problems:
            raise BuildError(f"{code}: differs from Engh & Huber: {'; '.join(problems)}")
        write_monomer(dest, code, reduced_document(code, doc), fixes)
        for f in fixes:
            log.info("%s: %s", code, f)
        if fixes:
            all_fixes[code] = fixes
    return all_fixes


def write_licence_and_readme(dest: Path, codes: list[str], fixes: dict[str, list[str]]) -> None:
    shutil.copyfile(LICENCE_DIR / "LGPL-3", dest / "COPYING")
    shutil.copyfile(LICENCE_DIR / "GPL-3", dest / "COPYING.GPL-3")
    lines = [f"      {code}: {f}" for code, fs in fixes.items() for f in fs] or ["      (none needed)"]
    (dest / "README.txt").write_text(README.format(version=SOURCE_VERSION, n=len(codes),
                                                   fixes="\n".join(lines)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=DEFAULT_SOURCE, help="CCP4 monomer directory (default %(default)s)")
    ap.add_argument("--dest", default=str(DEFAULT_DEST), help="output directory (default %(default)s)")
    ap.add_argument("--extra", nargs="*", default=[], help="more residue codes to include")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    codes = list(dict.fromkeys(CODES + [c.upper() for c in args.extra]))
    dest = Path(args.dest)
    try:
        # remove monomers written by an earlier run (list/ and the licence files are kept)
        for sub in dest.iterdir() if dest.is_dir() else []:
            if sub.is_dir() and len(sub.name) == 1:
                shutil.rmtree(sub)
        dest.mkdir(parents=True, exist_ok=True)
        fixes = build(Path(args.source), dest, codes)
        write_licence_and_readme(dest, codes, fixes)
    except BuildError as exc:
        log.error("%s", exc)
        return 1
    size = sum(p.stat().st_size for p in dest.rglob("*.cif"))
    log.info("wrote %d monomers to %s (%.0f kB of CIF); %d file(s) repaired",
             len(codes), dest, size / 1024, len(fixes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
