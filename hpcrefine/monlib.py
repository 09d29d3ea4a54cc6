"""Monomer library in the CCP4 format: residue templates, links and non-bonded types.

Where the monomers come from, in order: the directory given with ``--monlib DIR``, else the
directory in $CLIBD_MON, else the library hpcrefine ships (hpcrefine/data/monomers, from the
CCP4/REFMAC monomer library 5.41, LGPL-3). A library directory holds one file per residue type,
DIR/<first letter, lower case>/<CODE>.cif (the CCP4 layout; DIR/<CODE>.cif is accepted too).
Dictionaries given with ``--ligand file.cif`` take priority over the library; one file may hold
several data_comp_XXX blocks.

Links between residues (peptide, phosphodiester, disulfide, glycosidic), terminal modifications
and the non-bonded radii and H-bond roles always come from hpcrefine's own tables
(data/monomers/list/links.cif and energy_types.cif), whether or not the library directory has a
list/ of its own: the CCP4 list/mon_lib_list.cif is not read.

Chirality: the CCP4 files give only a sign (positiv, negativ, both) per chiral centre. The target
volume's magnitude is computed from the template's own ideal geometry: for a centre c with
neighbours a1, a2, a3 at distances d1, d2, d3 and angles alpha = a2-c-a3, beta = a1-c-a3,
gamma = a1-c-a2, the volume of the parallelepiped they span is
    V = d1 d2 d3 sqrt(1 - cos^2 alpha - cos^2 beta - cos^2 gamma + 2 cos alpha cos beta cos gamma)
(2.50 A^3 for an amino acid CA). A bond or angle that the template lacks is replaced by the sum of
covalent radii or the tetrahedral angle 109.47 degrees, which gives about 2.5 A^3 for a carbon
centre. Centres marked 'both' are not restrained.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import gemmi
import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

ENV_VAR = "CLIBD_MON"
CHIRAL_SIGMA = 0.2          # A^3, sigma of chiral-volume restraints
TETRAHEDRAL = 109.4712206   # degrees
HBOND_ROLES = {"none": 0, "donor": 1, "acceptor": 2, "both": 3}


def bundled_monlib_dir() -> str:
    """The monomer library installed with hpcrefine."""
    return str(Path(__file__).resolve().parent / "data" / "monomers")


def _looks_like_monlib(path: Path) -> bool:
    """True when path holds monomer files: <letter>/<CODE>.cif or <CODE>.cif."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return False
    for e in entries:
        if e.is_file() and e.name.lower().endswith(".cif") and e.name != "mon_lib_list.cif":
            return True
    for e in entries:
        if e.is_dir() and len(e.name) == 1:
            try:
                if any(f.name.lower().endswith(".cif") for f in os.scandir(e.path)):
                    return True
            except OSError:
                continue
    return False


def resolve_monlib_dir(cli_dir: str | None = None) -> str:
    """The monomer library directory: cli_dir (--monlib), else $CLIBD_MON, else the bundled one."""
    if cli_dir:
        where, path = "--monlib", cli_dir
    elif os.environ.get(ENV_VAR):
        where, path = f"${ENV_VAR}", os.environ[ENV_VAR]
    else:
        return bundled_monlib_dir()
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"monomer library {path} (from {where}) does not exist; give the directory "
                         f"that holds a/ALA.cif, b/..., or leave {where} unset to use the library "
                         f"hpcrefine ships")
    if not p.is_dir():
        raise InputError(f"monomer library {path} (from {where}) is not a directory; give the "
                         f"directory that holds a/ALA.cif, b/...")
    if not _looks_like_monlib(p):
        raise InputError(f"{path} (from {where}) holds no monomer files (expected <letter>/<CODE>.cif, "
                         f"e.g. a/ALA.cif, as in CCP4's $CLIBD_MON); point it at the 'monomers' "
                         f"directory of the library")
    return str(p.resolve())


# --------------------------------------------------------------------------------------------
# Templates

def _group_kind(group: str) -> str:
    g = group.lower()
    if "peptide" in g:
        return "peptide"
    if "rna" in g or "dna" in g:
        return "nucleic"
    if "pyranose" in g or "furanose" in g or "saccharide" in g:
        return "sugar"
    return "other"


@dataclass
class MonomerTemplate:
    """Ideal geometry of one residue type; atom indices refer to `atoms` (hydrogens included)."""

    code: str
    group: str
    atoms: list[str]
    element: list[str]
    type_energy: list[str]
    bond_idx: np.ndarray          # (nb, 2)
    bond_value: np.ndarray
    bond_esd: np.ndarray
    angle_idx: np.ndarray         # (na, 3), vertex in the middle
    angle_value: np.ndarray
    angle_esd: np.ndarray
    tors_idx: np.ndarray          # (nt, 4)
    tors_value: np.ndarray
    tors_esd: np.ndarray
    tors_period: np.ndarray
    tors_id: list[str]
    chir_idx: np.ndarray          # (nc, 4): centre, a1, a2, a3
    chir_sign: np.ndarray         # +1 positiv, -1 negativ, 0 both
    chir_volume: np.ndarray       # magnitude of the ideal volume (A^3)
    planes: list[tuple[np.ndarray, np.ndarray]]   # (atom indices, esd per atom)
    source: str = ""
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.index = {name: i for i, name in enumerate(self.atoms)}

    @property
    def kind(self) -> str:
        """peptide, nucleic, sugar or other (from chem_comp.group)."""
        return _group_kind(self.group)

    @property
    def is_hydrogen(self) -> np.ndarray:
        return np.array([e in ("H", "D") for e in self.element], dtype=bool)

    def has_bond(self, a: str, b: str) -> bool:
        ia, ib = self.index.get(a), self.index.get(b)
        if ia is None or ib is None:
            return False
        return bool(np.any(((self.bond_idx[:, 0] == ia) & (self.bond_idx[:, 1] == ib))
                           | ((self.bond_idx[:, 0] == ib) & (self.bond_idx[:, 1] == ia))))


def _str_col(table, i) -> list[str]:
    return [table[r].str(i) for r in range(len(table))]


def _num(v: str, default: float = float("nan")) -> float:
    if gemmi.cif.is_null(v):
        return default
    return gemmi.cif.as_number(v)


def _chiral_volume(centre: int, nbrs: list[int], element: list[str],
                   bonds: dict[frozenset, float], angles: dict[tuple, float]) -> float:
    def dist(a, b):
        d = bonds.get(frozenset((a, b)))
        if d is None:
            d = (gemmi.Element(element[a]).covalent_r + gemmi.Element(element[b]).covalent_r)
        return d

    def ang(a, b):
        v = angles.get((min(a, b), centre, max(a, b)))
        return math.radians(v if v is not None else TETRAHEDRAL)

    a1, a2, a3 = nbrs
    d1, d2, d3 = dist(centre, a1), dist(centre, a2), dist(centre, a3)
    ca, cb, cg = math.cos(ang(a2, a3)), math.cos(ang(a1, a3)), math.cos(ang(a1, a2))
    s = 1.0 - ca * ca - cb * cb - cg * cg + 2.0 * ca * cb * cg
    return d1 * d2 * d3 * math.sqrt(max(s, 0.0))


def _template_from_block(block: gemmi.cif.Block, code: str, group: str, source: str) -> MonomerTemplate:
    where = f"{source} (data_comp_{code})"
    atab = block.find("_chem_comp_atom.", ["atom_id", "type_symbol", "?type_energy"])
    if len(atab) == 0:
        raise InputError(f"{where}: no _chem_comp_atom loop")
    atoms = _str_col(atab, 0)
    element = [s.upper() for s in _str_col(atab, 1)]
    if atab.has_column(2):
        types = [t.upper() if not gemmi.cif.is_null(atab[r][2]) else element[r]
                 for r, t in enumerate(_str_col(atab, 2))]
    else:
        types = list(element)
    index = {n: i for i, n in enumerate(atoms)}
    if len(index) != len(atoms):
        dup = sorted({n for n in atoms if atoms.count(n) > 1})
        raise InputError(f"{where}: atom names listed twice: {', '.join(dup)}")

    def idx(names: list[str], what: str) -> list[int] | None:
        out = []
        for n in names:
            if n not in index:
                log.warning("%s: %s names atom %r, which is not in _chem_comp_atom; ignored", where, what, n)
                return None
            out.append(index[n])
        return out

    def targets(rows, n: int, what: str, default_esd: float, key_of, seen: dict):
        """Atom indices, targets and esds of the usable rows of a bond or angle loop (columns:
        n atom names, the target, the optional esd), keyed by key_of(indices) into seen; a key
        already seen (or None) is skipped."""
        t_idx, t_val, t_esd = [], [], []
        for row in rows:
            names = [row.str(c) for c in range(n)]
            ii = idx(names, what)
            if ii is None:
                continue
            key = key_of(ii)
            if key is None or key in seen:
                continue
            v = _num(row[n])
            s = _num(row[n + 1], default_esd) if row.has(n + 1) else default_esd
            if not (v > 0 and s > 0):
                raise InputError(f"{where}: {what} {'-'.join(names)} has no usable target/sigma")
            seen[key] = v
            t_idx.append(ii), t_val.append(v), t_esd.append(s)
        return t_idx, t_val, t_esd

    # bonds
    bonds: dict[frozenset, float] = {}
    tab = block.find("_chem_comp_bond.", ["atom_id_1", "atom_id_2", "value_dist", "?value_dist_esd"])
    if len(tab) == 0 and len(atoms) > 1:
        if block.find_values("_chem_comp_bond.value_order") or block.find_values("_chem_comp_bond.atom_id_1"):
            raise InputError(f"{where}: bonds have no target lengths (_chem_comp_bond.value_dist); this "
                             f"looks like a PDB chemical-component entry, not a restraint dictionary: "
                             f"make one with AceDRG or grade")
    b_idx, b_val, b_esd = targets(tab, 2, "bond", 0.02,
                                  lambda ij: frozenset(ij) if ij[0] != ij[1] else None, bonds)
    # angles
    angles: dict[tuple, float] = {}
    a_idx, a_val, a_esd = targets(
        block.find("_chem_comp_angle.", ["atom_id_1", "atom_id_2", "atom_id_3", "value_angle",
                                         "?value_angle_esd"]),
        3, "angle", 3.0, lambda ijk: (min(ijk[0], ijk[2]), ijk[1], max(ijk[0], ijk[2])), angles)
    # torsions
    t_idx, t_val, t_esd, t_per, t_id = [], [], [], [], []
    for row in block.find("_chem_comp_tor.", ["atom_id_1", "atom_id_2", "atom_id_3", "atom_id_4",
                                              "value_angle", "value_angle_esd", "?period", "?id"]):
        ijkl = idx([row.str(0), row.str(1), row.str(2), row.str(3)], "torsion")
        if ijkl is None:
            continue
        t_idx.append(ijkl)
        t_val.append(_num(row[4], 0.0))
        t_esd.append(_num(row[5], 0.0))
        t_per.append(int(_num(row[6], 1)) if row.has(6) else 1)
        t_id.append(row.str(7) if row.has(7) else "")
    # chirality
    c_idx, c_sign, c_vol = [], [], []
    for row in block.find("_chem_comp_chir.", ["atom_id_centre", "atom_id_1", "atom_id_2", "atom_id_3",
                                               "volume_sign"]):
        ijkl = idx([row.str(i) for i in range(4)], "chirality")
        if ijkl is None:
            continue
        sign = row.str(4).lower()
        s = 1 if sign.startswith("pos") else -1 if sign.startswith("neg") else 0
        if not (sign.startswith(("pos", "neg", "both"))):
            log.warning("%s: chiral centre %s has unknown sign %r; not restrained", where, row.str(0), sign)
        c_idx.append(ijkl)
        c_sign.append(s)
        c_vol.append(_chiral_volume(ijkl[0], ijkl[1:], element, bonds, angles))
    # planes
    plane_atoms: dict[str, list[tuple[int, float]]] = {}
    for row in block.find("_chem_comp_plane_atom.", ["plane_id", "atom_id", "?dist_esd"]):
        i = idx([row.str(1)], "plane")
        if i is None:
            continue
        esd = _num(row[2], 0.02) if row.has(2) else 0.02
        plane_atoms.setdefault(row.str(0), []).append((i[0], esd))
    planes = [(np.array([a for a, _ in v], dtype=np.int64), np.array([e for _, e in v]))
              for v in plane_atoms.values()]

    def arr(x, shape1):
        return np.array(x, dtype=np.int64).reshape(-1, shape1)

    return MonomerTemplate(
        code=code, group=group, atoms=atoms, element=element, type_energy=types,
        bond_idx=arr(b_idx, 2), bond_value=np.array(b_val, dtype=float), bond_esd=np.array(b_esd, dtype=float),
        angle_idx=arr(a_idx, 3), angle_value=np.array(a_val, dtype=float), angle_esd=np.array(a_esd, dtype=float),
        tors_idx=arr(t_idx, 4), tors_value=np.array(t_val, dtype=float), tors_esd=np.array(t_esd, dtype=float),
        tors_period=np.array(t_per, dtype=np.int64), tors_id=t_id,
        chir_idx=arr(c_idx, 4), chir_sign=np.array(c_sign, dtype=np.int64), chir_volume=np.array(c_vol, dtype=float),
        planes=planes, source=source)


@functools.lru_cache(maxsize=4096)
def _read_dictionary_file(path: str, mtime_ns: int, size: int) -> dict[str, MonomerTemplate]:
    """All data_comp_XXX blocks of one CCP4-format file (cached on path, mtime and size)."""
    try:
        doc = gemmi.cif.read(path)
    except Exception as exc:
        raise InputError(f"cannot read monomer dictionary {path}: {exc}") from None
    groups: dict[str, str] = {}
    for block in doc:
        tab = block.find("_chem_comp.", ["id", "?group"])
        for row in tab:
            if row.has(1) and not gemmi.cif.is_null(row[1]):
                groups[row.str(0)] = row.str(1)
    out = {}
    for block in doc:
        if not block.name.startswith("comp_") or block.name == "comp_list":
            continue
        if len(block.find_values("_chem_comp_atom.atom_id")) == 0:
            continue
        code = block.name[len("comp_"):]
        out[code] = _template_from_block(block, code, groups.get(code, "non-polymer"), path)
    if not out:
        has_atoms = any(len(b.find_values("_chem_comp_atom.atom_id")) for b in doc)
        hint = (" (it looks like a PDB chemical-component entry: restraint dictionaries have "
                "data_comp_XXX blocks with target bond lengths; make one with AceDRG or grade)"
                if has_atoms else "")
        raise InputError(f"{path} holds no monomer dictionary (no data_comp_XXX block with "
                         f"_chem_comp_atom){hint}")
    return out


def read_dictionary_file(path: str) -> dict[str, MonomerTemplate]:
    """Templates in one CCP4-format dictionary file, keyed by residue code."""
    try:
        st = os.stat(path)
    except OSError:
        raise InputError(f"dictionary file not found: {path}") from None
    if st.st_size == 0:
        raise InputError(f"dictionary file is empty: {path}")
    return _read_dictionary_file(os.path.abspath(path), st.st_mtime_ns, st.st_size)


# --------------------------------------------------------------------------------------------
# Links and energy types (hpcrefine's own tables)

@dataclass
class LinkDef:
    """Restraints of one link (two residues, res 1 and 2) or modification (res 1 only).

    Atoms are (name, res) with res 1 or 2."""

    id: str
    kind: str
    description: str
    bonds: list[tuple[tuple[str, int], tuple[str, int], float, float]] = field(default_factory=list)
    angles: list[tuple[tuple[str, int], tuple[str, int], tuple[str, int], float, float]] = field(default_factory=list)
    torsions: list[tuple[tuple, tuple, tuple, tuple, float, float, int]] = field(default_factory=list)
    planes: dict[str, list[tuple[tuple[str, int], float]]] = field(default_factory=dict)
    leaving: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)


@functools.lru_cache(maxsize=8)
def read_links(path: str) -> dict[str, LinkDef]:
    doc = gemmi.cif.read(path)
    b = doc.sole_block()
    links = {}
    for row in b.find("_hpcrefine_link.", ["id", "kind", "description"]):
        links[row.str(0)] = LinkDef(row.str(0), row.str(1), row.str(2))

    def at(row, i):
        return (row.str(i), int(row.str(i + 1)))

    def get(row):
        lid = row.str(0)
        if lid not in links:
            raise ValueError(f"{path}: restraint for undeclared link {lid!r}")
        return links[lid]

    for row in b.find("_hpcrefine_link_bond.", ["link_id", "atom_1", "res_1", "atom_2", "res_2",
                                                "value_dist", "value_dist_esd"]):
        get(row).bonds.append((at(row, 1), at(row, 3), float(row[5]), float(row[6])))
    for row in b.find("_hpcrefine_link_angle.", ["link_id", "atom_1", "res_1", "atom_2", "res_2", "atom_3",
                                                 "res_3", "value_angle", "value_angle_esd"]):
        get(row).angles.append((at(row, 1), at(row, 3), at(row, 5), float(row[7]), float(row[8])))
    for row in b.find("_hpcrefine_link_tor.", ["link_id", "id", "atom_1", "res_1", "atom_2", "res_2", "atom_3",
                                               "res_3", "atom_4", "res_4", "value_angle", "value_angle_esd",
                                               "period"]):
        get(row).torsions.append((at(row, 2), at(row, 4), at(row, 6), at(row, 8), float(row[10]),
                                  float(row[11]), int(row[12])))
    for row in b.find("_hpcrefine_link_plane.", ["link_id", "plane_id", "atom", "res", "dist_esd"]):
        get(row).planes.setdefault(row.str(1), []).append((at(row, 2), float(row[4])))
    for row in b.find("_hpcrefine_link_leaving.", ["link_id", "atom", "res", "replaced_by", "replaced_by_res"]):
        get(row).leaving.append((at(row, 1), at(row, 3)))
    return links


@dataclass
class EnergyTypes:
    """Non-bonded radius and H-bond role per energy type, with per-element fallbacks."""

    radius: dict[str, float]
    role: dict[str, int]
    element_radius: dict[str, float]
    element_role: dict[str, int]
    overrides: dict[tuple[str, str], int]
    hbond_distance: float

    def lookup(self, type_energy: str, element: str) -> tuple[float, int]:
        if type_energy in self.radius:
            return self.radius[type_energy], self.role[type_energy]
        el = element.upper()
        if el in self.element_radius:
            return self.element_radius[el], self.element_role[el]
        return self.element_radius["X"], self.element_role["X"]


@functools.lru_cache(maxsize=8)
def read_energy_types(path: str) -> EnergyTypes:
    doc = gemmi.cif.read(path)
    b = doc.sole_block()
    radius, role = {}, {}
    for row in b.find("_hpcrefine_energy_type.", ["type", "vdw_radius", "hbond"]):
        radius[row.str(0).upper()] = float(row[1])
        role[row.str(0).upper()] = HBOND_ROLES[row.str(2)]
    el_r, el_role = {}, {}
    for row in b.find("_hpcrefine_element_default.", ["element", "vdw_radius", "hbond"]):
        el_r[row.str(0).upper()] = float(row[1])
        el_role[row.str(0).upper()] = HBOND_ROLES[row.str(2)]
    over = {(row.str(0), row.str(1)): HBOND_ROLES[row.str(2)]
            for row in b.find("_hpcrefine_hbond_override.", ["comp_id", "atom_id", "hbond"])}
    hb = float(b.find_value("_hpcrefine_nonbond.hbond_distance") or 2.7)
    return EnergyTypes(radius, role, el_r, el_role, over, hb)


def bundled_links_path() -> str:
    return os.path.join(bundled_monlib_dir(), "list", "links.cif")


def bundled_energy_types_path() -> str:
    return os.path.join(bundled_monlib_dir(), "list", "energy_types.cif")


# --------------------------------------------------------------------------------------------
# The library

def _fmt_missing(codes: Iterable[str], examples: Mapping[str, str] | None) -> str:
    parts = []
    for c in sorted(codes):
        ex = (examples or {}).get(c)
        parts.append(f"{c} (e.g. {ex})" if ex else c)
    return ", ".join(parts)


class MonomerLibrary:
    """Residue templates from a CCP4-format monomer library plus --ligand dictionaries.

    Usage:
        lib = MonomerLibrary(args.monlib)         # --monlib, else $CLIBD_MON, else bundled
        lib.load({"ALA", "NAG"}, ["lig.cif"])     # InputError names what cannot be found
        lib["ALA"].bond_idx, lib.links["TRANS"], lib.energy.lookup("CH1", "C")
    """

    def __init__(self, directory: str | None = None):
        self.directory = resolve_monlib_dir(directory)
        self.templates: dict[str, MonomerTemplate] = {}
        self.ligand_files: list[str] = []
        self._ligand_templates: dict[str, MonomerTemplate] = {}
        self.links = read_links(bundled_links_path())
        self.energy = read_energy_types(bundled_energy_types_path())

    def __repr__(self) -> str:
        return f"MonomerLibrary({self.directory!r}, {len(self.templates)} loaded)"

    def __contains__(self, code: str) -> bool:
        return code in self.templates

    def __getitem__(self, code: str) -> MonomerTemplate:
        return self.templates[code]

    def monomer_path(self, code: str) -> str | None:
        """The library file for code, or None."""
        return _find_monomer_file(self.directory, code)

    def add_ligand_files(self, ligand_files: Iterable[str]) -> None:
        for path in ligand_files:
            if path in self.ligand_files:
                continue
            templates = read_dictionary_file(path)
            for code, t in templates.items():
                if code in self._ligand_templates:
                    log.warning("residue %s is defined in both %s and %s; using the latter",
                                code, self._ligand_templates[code].source, path)
                self._ligand_templates[code] = t
                self.templates.pop(code, None)   # a ligand file overrides what was loaded
            self.ligand_files.append(path)
            log.info("dictionary %s: %s", path, ", ".join(sorted(templates)))

    def missing(self, codes: Iterable[str]) -> list[str]:
        """The codes for which neither the --ligand files nor the library has a dictionary."""
        return sorted(c for c in set(codes) if c not in self.templates and c not in self._ligand_templates
                      and self.monomer_path(c) is None)

    def load(self, codes: Iterable[str], ligand_files: Iterable[str] = (),
             examples: Mapping[str, str] | None = None) -> None:
        """Read the templates of `codes` (--ligand files first, then the library).

        Raises InputError naming every code that no dictionary supplies; `examples` maps a code
        to one residue that has it (e.g. 'A/LIG301') for that message.
        """
        self.add_ligand_files(ligand_files)
        codes = set(codes)
        missing = self.missing(codes)
        if missing:
            raise InputError(
                f"no restraint dictionary for residue type{'s' if len(missing) > 1 else ''} "
                f"{_fmt_missing(missing, examples)} (looked in "
                f"{'the --ligand files and ' if self.ligand_files else ''}the monomer library "
                f"{self.directory}). Supply a dictionary with --ligand file.cif (CCP4 monomer "
                f"format, e.g. made by AceDRG or grade) or point --monlib DIR / {ENV_VAR} at a "
                f"library that has {'them' if len(missing) > 1 else 'it'}.")
        for code in sorted(codes - set(self.templates)):
            if code in self._ligand_templates:
                self.templates[code] = self._ligand_templates[code]
                continue
            path = self.monomer_path(code)
            found = read_dictionary_file(path)
            if code not in found:
                raise InputError(f"{path} has no data_comp_{code} block")
            self.templates[code] = found[code]


@functools.lru_cache(maxsize=8192)
def _find_monomer_file(directory: str, code: str) -> str | None:
    d = Path(directory)
    candidates = [d / code[0].lower() / f"{code}.cif",
                  d / code[0].lower() / f"{code}_{code}.cif",   # CCP4 names for CON, PRN, ...
                  d / code[0].upper() / f"{code}.cif",
                  d / f"{code}.cif"]
    for p in candidates:
        if p.is_file():
            return str(p)
    return None
