"""Reading and writing atomic models (gemmi), as flat numpy arrays.

The refinement core sees a model as arrays indexed by atom: coordinates, B, occupancy, element,
atom name, residue name, chain, and a global residue index. The gemmi Structure is kept alongside
so that the written model keeps everything the input had (chains, assemblies, metadata).
Hydrogens are removed on reading (refinement is done without riding hydrogens); the log says so.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace

import gemmi
import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

PDB_MAX_ATOMS = 99999


@dataclass
class Model:
    """Flat per-atom view of a structure's first model (hydrogens removed)."""

    st: gemmi.Structure
    xyz: np.ndarray         # (n, 3) float64, Angstrom
    b: np.ndarray           # (n,) float64
    occ: np.ndarray         # (n,) float64
    element: np.ndarray     # (n,) str, upper case ('C', 'N', 'FE', ...)
    atom_name: np.ndarray   # (n,) str
    res_name: np.ndarray    # (n,) str
    chain: np.ndarray       # (n,) str
    res_index: np.ndarray   # (n,) int64, global residue index 0..nres-1 in file order
    altloc: np.ndarray      # (n,) str, '' when none
    # per residue (length nres)
    res_chain: np.ndarray   # (nres,) str
    res_seqid: np.ndarray   # (nres,) str, e.g. '12' or '12A' (author numbering, for messages)
    res_label_seq: np.ndarray  # (nres,) int64, position in the chain's polymer sequence, -1 if none
    res_names: np.ndarray   # (nres,) str
    res_is_polymer: np.ndarray  # (nres,) bool: part of the chain's polymer (peptide or nucleic acid)
    res_first_atom: np.ndarray  # (nres+1,) int64: atoms of residue r are first[r]:first[r+1]

    @property
    def n_atoms(self) -> int:
        # (a worker that holds the start in parts has no xyz: refine.run_refine)
        return len(self.xyz) if self.xyz is not None else int(self.res_first_atom[-1])

    @property
    def n_residues(self) -> int:
        return len(self.res_names)

    def residue_label(self, r: int) -> str:
        return f"{self.res_chain[r]}/{self.res_names[r]}{self.res_seqid[r]}"


def _check_readable(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"model file not found: {path}")
    if os.path.getsize(path) == 0:
        raise InputError(f"model file is empty: {path}")


def read_structure(path: str) -> gemmi.Structure:
    """Read a PDB or mmCIF file with gemmi; a clear InputError when it cannot be read."""
    _check_readable(path)
    try:
        st = gemmi.read_structure(path, merge_chain_parts=True)
    except Exception as exc:  # gemmi raises RuntimeError/ValueError with a useful text
        raise InputError(f"cannot read model {path}: {exc}") from None
    if len(st) == 0 or st[0].count_atom_sites() == 0:
        raise InputError(f"model file {path} holds no atoms (truncated or not a model file?)")
    st.setup_entities()
    return st


def model_from_structure(st: gemmi.Structure) -> Model:
    """Flatten the first model of st (hydrogens removed from st in place)."""
    if len(st) > 1:
        log.info("model file has %d models; refining the first", len(st))
        while len(st) > 1:
            del st[1]
    n_h = sum(1 for cra in st[0].all() if cra.atom.is_hydrogen()) if st[0].has_hydrogen() else 0
    if n_h:
        log.info("removing %d hydrogen atoms (refinement runs without hydrogens)", n_h)
        st.remove_hydrogens()
    st.remove_empty_chains()
    model = st[0]
    # per atom only what differs between atoms, in lists (a numpy item assignment or a second
    # attribute lookup per atom cost 1.2 s of 2.4 at a million atoms); what every atom of a
    # residue shares is repeated per residue afterwards
    xyz, b, occ, element, atom_name, altloc, counts = [], [], [], [], [], [], []
    res_chain, res_seqid, res_label_seq, res_names, res_poly = [], [], [], [], []
    for ch in model:
        polymer = ch.get_polymer()
        poly_set = set()
        for res in polymer:
            poly_set.add((res.seqid.num, res.seqid.icode))
        name = ch.name
        for res in ch:
            seqid = res.seqid
            res_chain.append(name)
            res_seqid.append(str(seqid).strip())
            res_label_seq.append(res.label_seq if res.label_seq is not None else -1)
            res_names.append(res.name)
            res_poly.append((seqid.num, seqid.icode) in poly_set
                            and res.entity_type == gemmi.EntityType.Polymer)
            k = 0
            for at in res:
                p = at.pos
                xyz.append((p.x, p.y, p.z))
                b.append(at.b_iso)
                occ.append(at.occ)
                element.append(at.element.name)
                atom_name.append(at.name)
                altloc.append(at.altloc)
                k += 1
            counts.append(k)
    counts = np.array(counts, dtype=np.int64)
    n = int(counts.sum())
    first = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    res_index = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    res_names = np.array(res_names)
    res_chain = np.array(res_chain)
    # element names upper case, altloc "\0" (none) as "": once per distinct value
    element = np.array(element)
    kinds, back = np.unique(element, return_inverse=True)
    element = np.array([e.upper() for e in kinds.tolist()])[back.reshape(-1)] if n else element
    altloc = np.array(["" if a == "\0" else a for a in altloc])
    return Model(st=st, xyz=np.array(xyz, dtype=np.float64).reshape(n, 3), b=np.array(b, dtype=np.float64),
                 occ=np.array(occ, dtype=np.float64), element=element, atom_name=np.array(atom_name),
                 res_name=res_names[res_index], chain=res_chain[res_index], res_index=res_index,
                 altloc=altloc, res_chain=res_chain, res_seqid=np.array(res_seqid),
                 res_label_seq=np.array(res_label_seq, dtype=np.int64), res_names=res_names,
                 res_is_polymer=np.array(res_poly, dtype=bool), res_first_atom=first)


def read_model(path: str, comm=None, structure_everywhere: bool = True) -> Model:
    """Read a PDB/mmCIF model into a Model (hydrogens removed).

    With a communicator of several ranks (collective over it), its rank 0 alone parses the file
    and sends the Model (gemmi's Structure pickles compactly) to the others, which wait without
    spinning: parsing an mmCIF file holds its whole text and tables at once (1.27 GB of peak
    memory for a million atoms, against 0.22 GB for the Model unpacked), so the other ranks
    never do. A bad file raises the same InputError on every rank. structure_everywhere=False:
    the others get the Model without its gemmi Structure (st None), when only rank 0 reads it
    (refine: the workers read it only to search for NCS)."""
    if comm is None or comm.Get_size() == 1:
        return _read_model(path)
    from .parallel.distributed import made_once

    whole = {}

    def read():
        whole["model"] = _read_model(path)
        return whole["model"] if structure_everywhere else replace(whole["model"], st=None)
    got = made_once(comm, read, what=f"reading model {path}")
    return whole.get("model", got)


def _read_model(path: str) -> Model:
    model = model_from_structure(read_structure(path))
    if not np.all(np.isfinite(model.xyz)):
        raise InputError(f"model {path} has non-finite coordinates")
    return model


def fits_pdb(st: gemmi.Structure) -> tuple[bool, str]:
    """Whether st can be written as PDB; if not, the reason."""
    n = st[0].count_atom_sites()
    if n > PDB_MAX_ATOMS:
        return False, f"{n} atoms exceed the PDB format's {PDB_MAX_ATOMS}"
    long_ids = sorted({ch.name for ch in st[0] if len(ch.name) != 1})
    if long_ids:
        return False, f"chain ids longer than one character ({', '.join(long_ids[:5])}...)"
    return True, ""


def updated_structure(model: Model, xyz: np.ndarray, b: np.ndarray | None = None,
                      occ: np.ndarray | None = None) -> gemmi.Structure:
    """A copy of the model's structure with new coordinates (and B-factors, and occupancies)."""
    st = model.st.clone()
    rows = np.asarray(xyz, dtype=np.float64).tolist()       # Python floats once, not per atom
    bs = None if b is None else np.asarray(b, dtype=np.float64).tolist()
    occs = None if occ is None else np.asarray(occ, dtype=np.float64).tolist()
    i = 0
    for ch in st[0]:
        for res in ch:
            for at in res:
                at.pos = gemmi.Position(*rows[i])
                if bs is not None:
                    at.b_iso = bs[i]
                if occs is not None:
                    at.occ = occs[i]
                i += 1
    assert i == len(rows), "structure and coordinate array disagree"
    return st


def atomic_write_with(path: str, write) -> None:
    """write(part) writes the file path.part, which is then synced and renamed over path: a
    reader sees either the old file or the whole new one, never a partial write."""
    tmp = path + ".part"
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_all(path: str, data, mode: str) -> None:
    with open(path, mode) as fh:
        fh.write(data)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_with(path, lambda tmp: _write_all(tmp, text, "w"))


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write_with(path, lambda tmp: _write_all(tmp, data, "wb"))


def write_model(st: gemmi.Structure, stem: str) -> list[str]:
    """Write stem.cif always and stem.pdb when the model fits PDB; returns the paths written."""
    doc = st.make_mmcif_document()
    paths = [stem + ".cif"]
    atomic_write_with(paths[0], doc.write_file)     # from gemmi's text, not a Python string of it
    ok, why = fits_pdb(st)
    if ok:
        atomic_write_text(stem + ".pdb", st.make_pdb_string())
        paths.append(stem + ".pdb")
    else:
        log.info("not writing PDB format (%s); the mmCIF file holds the model", why)
    return paths
