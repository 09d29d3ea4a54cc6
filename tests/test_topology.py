"""Restraints built from the monomer library on real models (adk, 7cth, 6zu5)."""
from __future__ import annotations

import re
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from hpcrefine import datasets
from hpcrefine.core.geometry import deviations
from hpcrefine.errors import InputError
from hpcrefine.modelio import Model, model_from_structure, read_model, read_structure
from hpcrefine.monlib import MonomerLibrary, bundled_monlib_dir
from hpcrefine.topology import build_restraints, geometry_stats

BUNDLED = Path(bundled_monlib_dir())


@pytest.fixture(scope="module")
def paths():
    return datasets.fetch(["adk_closed", "7cth", "6zu5"])


@pytest.fixture(scope="module")
def adk(paths):
    m = read_model(paths["adk_closed"])
    return m, build_restraints(m, MonomerLibrary())


@pytest.fixture(scope="module")
def cth(paths):
    m = read_model(paths["7cth"])
    return m, build_restraints(m, MonomerLibrary())


@pytest.fixture(scope="module")
def zu5(paths):
    m = read_model(paths["6zu5"])
    t = time.perf_counter()
    r = build_restraints(m, MonomerLibrary())
    return m, r, time.perf_counter() - t


def _label(m: Model, i: int) -> str:
    return f"{m.residue_label(m.res_index[i])}:{m.atom_name[i]}"


def _inter_bonds(m: Model, r, name1: str, name2: str) -> np.ndarray:
    """Bond rows between two residues joining atoms named name1 and name2 (in either order)."""
    i, j = r.bond_idx[:, 0], r.bond_idx[:, 1]
    diff = m.res_index[i] != m.res_index[j]
    fwd = (m.atom_name[i] == name1) & (m.atom_name[j] == name2)
    rev = (m.atom_name[i] == name2) & (m.atom_name[j] == name1)
    return r.bond_idx[diff & (fwd | rev)]


def _peptide_bonds(m: Model, r) -> set:
    """{(residue of C, residue of N)} for inter-residue C-N bonds."""
    out = set()
    for a, b in _inter_bonds(m, r, "C", "N"):
        c, n = (a, b) if m.atom_name[a] == "C" else (b, a)
        out.add((int(m.res_index[c]), int(m.res_index[n])))
    return out


# ------------------------------------------------------------------------------------------ adk

def test_adk_peptide_links_and_geometry(adk):
    m, r = adk
    assert m.n_residues == 214
    links = _peptide_bonds(m, r)
    assert len(links) == 213
    assert links == {(k, k + 1) for k in range(213)}
    s = geometry_stats(m.xyz, r)
    assert s["bond_rmsd"] < 0.03
    assert s["angle_rmsd"] < 3.0
    assert s["chiral_inversions"] == 0
    names = m.res_names.tolist()
    # one CA per residue but glycine, and CB of each THR and ILE
    assert s["n_chirals"] == len(names) - names.count("GLY") + names.count("THR") + names.count("ILE")
    assert s["planarity_rmsd"] < 0.05


def test_adk_termini_and_cis_proline(adk):
    m, r = adk
    # N-terminus: nothing bonds to the first residue's N from outside
    n0 = np.nonzero((m.res_index == 0) & (m.atom_name == "N"))[0][0]
    partners = r.bond_idx[(r.bond_idx == n0).any(axis=1)].ravel()
    assert set(m.res_index[partners].tolist()) == {0}
    # C-terminus: OXT restrained by the COO modification
    oxt = np.nonzero(m.atom_name == "OXT")[0]
    assert len(oxt) == 1
    rows = r.bond_idx[(r.bond_idx == oxt[0]).any(axis=1)]
    assert len(rows) == 1 and set(m.atom_name[rows[0]].tolist()) == {"C", "OXT"}
    ang = r.angle_idx[(r.angle_idx == oxt[0]).any(axis=1)]
    assert sorted(m.atom_name[ang[:, 0]].tolist() + m.atom_name[ang[:, 2]].tolist()).count("OXT") == 2
    # PHE86-PRO87 is cis in adenylate kinase: its omega is restrained to 0, the others to 180
    omega = [k for k in range(len(r.tors_idx))
             if m.res_index[r.tors_idx[k, 0]] != m.res_index[r.tors_idx[k, 3]]]
    assert len(omega) == 213
    cis = [k for k in omega if r.tors_target[k] == 0.0]
    assert [m.residue_label(m.res_index[r.tors_idx[k, 3]]) for k in cis] == ["A/PRO87"]
    # the link into proline restrains C(i)-N-CD
    cd = np.nonzero((m.res_names[m.res_index] == "PRO") & (m.atom_name == "CD"))[0]
    vertex_n = r.angle_idx[np.isin(r.angle_idx[:, 2], cd) | np.isin(r.angle_idx[:, 0], cd)]
    c_n_cd = [row for row in vertex_n if "C" in m.atom_name[row[[0, 2]]].tolist()
              and m.atom_name[row[1]] == "N"]
    assert len(c_n_cd) == int((m.res_names[1:] == "PRO").sum())


def test_geometry_stats_agree_with_the_refinement_kernels(adk, cth):
    for m, r in (adk, cth):
        ours = geometry_stats(m.xyz, r)
        core = deviations(m.xyz, r)
        for key in ("bond_rmsd", "angle_rmsd", "torsion_rmsd", "chiral_rmsd", "planarity_rmsd"):
            assert ours[key] == pytest.approx(core[key], rel=1e-9, abs=1e-12), key


def _graph_pairs(n: int, bonds: np.ndarray):
    """1-2/1-3 and 1-4 pairs by breadth-first search (reference for the sparse version)."""
    nbr = [[] for _ in range(n)]
    for a, b in bonds.tolist():
        nbr[a].append(b)
        nbr[b].append(a)
    near, p14 = set(), set()
    for s in range(n):
        dist = {s: 0}
        q = deque([s])
        while q:
            u = q.popleft()
            if dist[u] == 3:
                continue
            for v in nbr[u]:
                if v not in dist:
                    dist[v] = dist[u] + 1
                    q.append(v)
        for v, d in dist.items():
            if v > s:
                (near if d <= 2 else p14).add((s, v))
    return near, p14


def test_exclusions_are_the_bond_graph_neighbours(adk):
    m, r = adk
    near, p14 = _graph_pairs(m.n_atoms, r.bond_idx)
    assert set(map(tuple, r.excl_pairs.tolist())) == near
    assert set(map(tuple, r.pair14.tolist())) == p14
    assert np.all(r.excl_pairs[:, 0] < r.excl_pairs[:, 1])
    assert np.all(r.pair14[:, 0] < r.pair14[:, 1])


def test_nonbonded_types(adk):
    m, r = adk
    assert r.vdw_radius.shape == (m.n_atoms,) and r.hbond_type.shape == (m.n_atoms,)
    by = lambda res, name: r.vdw_radius[(m.res_names[m.res_index] == res) & (m.atom_name == name)]  # noqa: E731
    assert np.all(by("ALA", "CB") == 1.70)
    assert np.all(by("MET", "SD") == 1.90)
    hb = dict(zip(m.atom_name.tolist(), r.hbond_type.tolist()))
    assert hb["N"] == 1 and hb["O"] == 2 and hb["OXT"] == 2 and hb["CA"] == 0


# ------------------------------------------------------------------------------------------ 7cth

def test_7cth_glycosylation_disulfides_and_geometry(cth):
    m, r = cth
    nd2_c1 = _inter_bonds(m, r, "ND2", "C1")
    assert len(nd2_c1) == 4
    for a, b in nd2_c1:
        assert {m.res_names[m.res_index[a]], m.res_names[m.res_index[b]]} == {"ASN", "NAG"}
    # NAG C1 keeps its (beta) chirality with ND2 in place of O1
    for a, b in nd2_c1:
        c1 = a if m.atom_name[a] == "C1" else b
        rows = r.chir_idx[r.chir_idx[:, 0] == c1]
        assert len(rows) == 1 and m.atom_name[rows[0]].tolist().count("ND2") == 1
    # disulfides: every SG pair closer than 2.5 A
    sg = np.nonzero(m.atom_name == "SG")[0]
    d = np.linalg.norm(m.xyz[sg][:, None] - m.xyz[sg][None], axis=2)
    n_ss = int((np.triu(d < 2.5, k=1)).sum())
    assert n_ss > 0
    assert len(_inter_bonds(m, r, "SG", "SG")) == n_ss
    s = geometry_stats(m.xyz, r)
    assert s["bond_rmsd"] < 0.02 and s["angle_rmsd"] < 2.0 and s["chiral_inversions"] == 0
    # no links across the gaps in label_seq of this model
    for c, n in _peptide_bonds(m, r):
        assert m.res_label_seq[n] - m.res_label_seq[c] == 1


def test_7cth_alternative_conformations(cth):
    m, r = cth
    alt = m.altloc
    assert set(alt.tolist()) >= {"A", "B"}
    for arr in (r.bond_idx, r.angle_idx, r.tors_idx, r.chir_idx):
        letters = alt[arr]
        has_a = (letters == "A").any(axis=1)
        has_b = (letters == "B").any(axis=1)
        assert not (has_a & has_b).any()
    # each conformer keeps its own restraints: every altloc atom has its bonds
    deg = np.bincount(r.bond_idx.ravel(), minlength=m.n_atoms)
    assert np.all(deg[alt != ""] >= 1)
    for res in np.unique(m.res_index[alt != ""]):
        atoms = np.nonzero(m.res_index == res)[0]
        for name in set(m.atom_name[atoms].tolist()):
            same = atoms[m.atom_name[atoms] == name]
            if len(same) == 2:
                assert deg[same[0]] == deg[same[1]], (m.residue_label(res), name)
    # restraints are not duplicated by the conformer bookkeeping
    assert len(np.unique(np.sort(r.bond_idx, axis=1), axis=0)) == len(r.bond_idx)
    # atoms of different conformers never repel each other
    a = np.nonzero(alt == "A")[0]
    b = np.nonzero(alt == "B")[0]
    excl = set(map(tuple, r.excl_pairs.tolist()))
    same_res = [(min(i, j), max(i, j)) for i in a for j in b if m.res_index[i] == m.res_index[j]]
    assert same_res and all(p in excl for p in same_res)


# ------------------------------------------------------------------------------------------ 6zu5

def test_6zu5_ribosome(zu5):
    m, r, seconds = zu5
    assert m.n_atoms == 165175
    assert seconds < 10.0
    k = np.arange(m.n_residues - 1)
    consecutive = ((m.res_chain[k] == m.res_chain[k + 1]) & m.res_is_polymer[k] & m.res_is_polymer[k + 1]
                   & (m.res_label_seq[k + 1] - m.res_label_seq[k] == 1))
    nucleic = np.isin(m.res_names, ["A", "C", "G", "U"])
    pairs_nuc = k[consecutive & nucleic[k] & nucleic[k + 1]]
    pairs_pep = k[consecutive & ~nucleic[k] & ~nucleic[k + 1]]
    o3p = _inter_bonds(m, r, "O3'", "P")
    assert len(o3p) == len(pairs_nuc) > 3000
    assert len(_peptide_bonds(m, r)) == len(pairs_pep)
    gaps = k[(m.res_chain[k] == m.res_chain[k + 1]) & m.res_is_polymer[k] & m.res_is_polymer[k + 1]
             & (m.res_label_seq[k + 1] - m.res_label_seq[k] > 1)]
    assert len(gaps) > 0
    linked = {(int(m.res_index[a]), int(m.res_index[b])) for a, b in r.bond_idx
              if m.res_index[a] != m.res_index[b]}
    linked |= {(b, a) for a, b in linked}
    assert not any((g, g + 1) in linked for g in gaps.tolist())
    s = geometry_stats(m.xyz, r)
    assert s["bond_rmsd"] < 0.02 and s["angle_rmsd"] < 2.0 and s["chiral_inversions"] == 0
    d = np.linalg.norm(m.xyz[o3p[:, 0]] - m.xyz[o3p[:, 1]], axis=1)
    assert np.median(d) == pytest.approx(1.607, abs=0.02)


def _tile(m: Model, k: int) -> Model:
    """k copies of m side by side, as one model with renamed chains."""
    n, nr = m.n_atoms, m.n_residues
    cat = lambda a: np.concatenate([a] * k)  # noqa: E731
    tag = lambda a: np.concatenate([np.char.add(a, f"_{c}") for c in range(k)])  # noqa: E731
    return Model(st=m.st, xyz=np.concatenate([m.xyz + [500.0 * c, 0, 0] for c in range(k)]),
                 b=cat(m.b), occ=cat(m.occ), element=cat(m.element), atom_name=cat(m.atom_name),
                 res_name=cat(m.res_name), chain=tag(m.chain),
                 res_index=np.concatenate([m.res_index + c * nr for c in range(k)]), altloc=cat(m.altloc),
                 res_chain=tag(m.res_chain), res_seqid=cat(m.res_seqid), res_label_seq=cat(m.res_label_seq),
                 res_names=cat(m.res_names), res_is_polymer=cat(m.res_is_polymer),
                 res_first_atom=np.concatenate([m.res_first_atom[:-1] + c * n for c in range(k)] + [[k * n]]))


def test_a_million_atoms_in_well_under_a_minute(zu5):
    m, r1, _ = zu5
    big = _tile(m, 6)
    assert big.n_atoms > 990_000
    t = time.perf_counter()
    r = build_restraints(big, MonomerLibrary())
    assert time.perf_counter() - t < 30.0
    assert r.counts() == {k: 6 * v for k, v in r1.counts().items()}
    assert len(r.excl_pairs) == 6 * len(r1.excl_pairs) and len(r.pair14) == 6 * len(r1.pair14)


# ------------------------------------------------------------------------------- user input

def _adk_structure(paths):
    return read_structure(paths["adk_closed"])


def _dictionary_from(code: str, new_code: str) -> str:
    text = (BUNDLED / code[0].lower() / f"{code}.cif").read_text()
    text = re.sub(rf"(?m)^{code}(\s)", rf"{new_code}\1", text)
    return text.replace(f"data_comp_{code}", f"data_comp_{new_code}")


def test_unknown_residue_needs_a_dictionary(paths, adk, tmp_path):
    st = _adk_structure(paths)
    res = next(res for res in st[0]["A"] if res.name == "ALA")
    label = f"A/XYZ{res.seqid.num}"
    res.name = "XYZ"
    m = model_from_structure(st)
    with pytest.raises(InputError) as err:
        build_restraints(m, MonomerLibrary())
    assert "XYZ" in str(err.value) and label in str(err.value) and "--ligand" in str(err.value)
    lig = tmp_path / "xyz.cif"
    lig.write_text(_dictionary_from("ALA", "XYZ"))
    lib = MonomerLibrary()
    lib.load(set(m.res_names.tolist()), [str(lig)])
    r = build_restraints(m, lib)
    assert r.counts() == adk[1].counts()

    def bonds(rr):
        return {(min(a, b), max(a, b), round(t, 4)) for (a, b), t in zip(rr.bond_idx.tolist(), rr.bond_target)}

    assert bonds(r) == bonds(adk[1])


def test_no_link_across_a_gap_in_the_sequence(paths, adk):
    st = _adk_structure(paths)
    chain = st[0]["A"]
    for _ in range(3):            # remove residues 50-52 (index 49..51): label_seq jumps 49 -> 53
        del chain[49]
    m = model_from_structure(st)
    r = build_restraints(m, MonomerLibrary())
    links = _peptide_bonds(m, r)
    assert len(links) == 213 - 4
    assert (48, 49) not in links       # residue 49 and residue 53 are now neighbours in the file
    # without label_seq, the author numbering tells the gap
    m.res_label_seq[:] = -1
    r2 = build_restraints(m, MonomerLibrary())
    assert _peptide_bonds(m, r2) == links


def test_monlib_and_clibd_mon_precedence(paths, adk, tmp_path, monkeypatch):
    m, r_bundled = adk
    codes = sorted(set(m.res_names.tolist()))

    def library(root: Path, ca_cb: str) -> Path:
        for code in codes:
            dst = root / code[0].lower() / f"{code}.cif"
            dst.parent.mkdir(parents=True, exist_ok=True)
            text = (BUNDLED / code[0].lower() / f"{code}.cif").read_text()
            if code == "ALA":
                text = text.replace("CA CB  single 1.521", f"CA CB  single {ca_cb}")
                assert ca_cb in text
            dst.write_text(text)
        return root

    env_lib = library(tmp_path / "env", "1.600")
    cli_lib = library(tmp_path / "cli", "1.700")
    ala_cb = np.nonzero((m.res_names[m.res_index] == "ALA") & (m.atom_name == "CB"))[0]

    def ca_cb_targets(r):
        rows = np.isin(r.bond_idx, ala_cb).any(axis=1)
        return set(np.round(r.bond_target[rows], 3).tolist())

    monkeypatch.delenv("CLIBD_MON", raising=False)
    assert ca_cb_targets(r_bundled) == {1.521}
    monkeypatch.setenv("CLIBD_MON", str(env_lib))
    assert ca_cb_targets(build_restraints(m, MonomerLibrary())) == {1.600}
    assert ca_cb_targets(build_restraints(m, MonomerLibrary(str(cli_lib)))) == {1.700}
    # a library without list/ still gets the links
    assert len(_peptide_bonds(m, build_restraints(m, MonomerLibrary(str(cli_lib))))) == 213
