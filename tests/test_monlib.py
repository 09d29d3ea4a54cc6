"""The bundled monomer library, its own tables, and MonomerLibrary.

The reference copy of the CCP4 monomer library is Debian's refmac-dictionary (5.41), found at
$HPCREFINE_REFMAC_DICT (default /usr/share/refmac/monomers); CI installs it, and these tests fail
rather than skip without it.
"""
from __future__ import annotations

import importlib.util
import math
import os
import re
import sys
import time
from pathlib import Path

import gemmi
import numpy as np
import pytest

from hpcrefine import monlib
from hpcrefine.errors import InputError
from hpcrefine.monlib import MonomerLibrary, bundled_monlib_dir, resolve_monlib_dir

REFERENCE = os.environ.get("HPCREFINE_REFMAC_DICT", "/usr/share/refmac/monomers")
REPO = Path(__file__).resolve().parents[1]
BUNDLED = Path(bundled_monlib_dir())

STANDARD = ["ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS",
            "MET", "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "MSE",
            "A", "C", "G", "U", "DA", "DC", "DG", "DT"]
REQUIRED = STANDARD + ["HOH", "MG", "ZN", "CA", "NA", "CL", "K", "MN", "FE", "SO4", "PO4",
                       "NAG", "AMP", "ATP", "ADP", "GTP", "GDP", "MAN", "BMA", "FUC"]
KEPT = {"_chem_comp.", "_chem_comp_atom.", "_chem_comp_bond.", "_chem_comp_angle.",
        "_chem_comp_tor.", "_chem_comp_chir.", "_chem_comp_plane_atom."}

# Engh & Huber (1991) targets of the two residues whose Debian files carried defects.
ENGH_HUBER = {
    "TRP": {("CB", "CG"): 1.498, ("CG", "CD1"): 1.365, ("CG", "CD2"): 1.433, ("CD1", "NE1"): 1.374,
            ("NE1", "CE2"): 1.370, ("CD2", "CE2"): 1.409, ("CD2", "CE3"): 1.398, ("CE2", "CZ2"): 1.394,
            ("CE3", "CZ3"): 1.382, ("CZ2", "CH2"): 1.368, ("CZ3", "CH2"): 1.400,
            ("CA", "CB", "CG"): 113.6, ("CB", "CG", "CD1"): 126.9, ("CB", "CG", "CD2"): 126.8,
            ("CD1", "CG", "CD2"): 106.3, ("CG", "CD1", "NE1"): 110.2, ("CD1", "NE1", "CE2"): 108.9,
            ("NE1", "CE2", "CD2"): 107.4, ("CE2", "CD2", "CG"): 107.2, ("NE1", "CE2", "CZ2"): 130.1,
            ("CE3", "CD2", "CE2"): 118.8, ("CD2", "CE2", "CZ2"): 122.4, ("CD2", "CE3", "CZ3"): 118.6,
            ("CE3", "CZ3", "CH2"): 121.1, ("CZ3", "CH2", "CZ2"): 121.5, ("CH2", "CZ2", "CE2"): 117.5},
    "HIS": {("CB", "CG"): 1.497, ("CG", "ND1"): 1.378, ("CG", "CD2"): 1.354, ("ND1", "CE1"): 1.321,
            ("CE1", "NE2"): 1.321, ("NE2", "CD2"): 1.374,
            ("CA", "CB", "CG"): 113.8, ("CB", "CG", "ND1"): 122.7, ("CB", "CG", "CD2"): 131.2,
            ("ND1", "CG", "CD2"): 106.1, ("CG", "ND1", "CE1"): 109.3, ("ND1", "CE1", "NE2"): 108.4,
            ("CE1", "NE2", "CD2"): 109.0, ("NE2", "CD2", "CG"): 107.2},
}


def _reference_path(code: str) -> Path:
    return Path(REFERENCE) / code[0].lower() / f"{code}.cif"


def _read_cif_text(path: Path) -> gemmi.cif.Document:
    """Read a monomer file; stray text before the first block (HIS in the Debian copy) is skipped."""
    text = path.read_text()
    m = re.search(r"^(#|data_|global_)", text, flags=re.MULTILINE)
    return gemmi.cif.read_string(text[m.start():])


def _geometry(path: Path, code: str) -> dict:
    """{(a, b): (d, esd)} and {(a, vertex, c): (angle, esd)} with end atoms in sorted order."""
    block = _read_cif_text(path).find_block(f"comp_{code}")
    out = {}
    for row in block.find("_chem_comp_bond.", ["atom_id_1", "atom_id_2", "value_dist", "value_dist_esd"]):
        out[tuple(sorted((row.str(0), row.str(1))))] = (float(row[2]), float(row[3]))
    for row in block.find("_chem_comp_angle.", ["atom_id_1", "atom_id_2", "atom_id_3", "value_angle",
                                                "value_angle_esd"]):
        a, c = sorted((row.str(0), row.str(2)))
        out[(a, row.str(1), c)] = (float(row[3]), float(row[4]))
    return out


def _key(atoms: tuple) -> tuple:
    if len(atoms) == 2:
        return tuple(sorted(atoms))
    a, c = sorted((atoms[0], atoms[2]))
    return (a, atoms[1], c)


def test_reference_library_is_installed():
    assert os.path.isdir(REFERENCE), (
        f"reference CCP4 monomer library not found at {REFERENCE}: install Debian's "
        f"refmac-dictionary or set HPCREFINE_REFMAC_DICT")
    assert _reference_path("ALA").is_file()


@pytest.mark.parametrize("code", STANDARD)
def test_bundled_targets_match_reference(code):
    ref = _geometry(_reference_path(code), code)
    ours = _geometry(BUNDLED / code[0].lower() / f"{code}.cif", code)
    assert len(ref) > 0
    assert ours.keys() == ref.keys()
    for k, (v, s) in ref.items():
        assert ours[k][0] == pytest.approx(v, abs=1e-3), k
        assert ours[k][1] == pytest.approx(s, abs=1e-3), k


@pytest.mark.parametrize("code", ["TRP", "HIS"])
def test_repaired_residues_have_engh_huber_geometry(code):
    ours = _geometry(BUNDLED / code[0].lower() / f"{code}.cif", code)
    for atoms, target in ENGH_HUBER[code].items():
        tol = 1e-3 if len(atoms) == 2 else 0.05
        assert ours[_key(atoms)][0] == pytest.approx(target, abs=tol), atoms


def test_repairs_of_the_debian_copy():
    # HIS: the Debian file starts with a stray 'f' and does not parse; the bundled copy does
    his = gemmi.cif.read(str(BUNDLED / "h" / "HIS.cif"))
    assert his.find_block("comp_HIS") is not None
    assert "Repaired:" in (BUNDLED / "h" / "HIS.cif").read_text()
    # TRP: bond CD1-NE1 had type 'sinlge'
    trp = gemmi.cif.read(str(BUNDLED / "t" / "TRP.cif")).find_block("comp_TRP")
    types = {tuple(sorted((r.str(0), r.str(1)))): r.str(2)
             for r in trp.find("_chem_comp_bond.", ["atom_id_1", "atom_id_2", "type"])}
    assert types[("CD1", "NE1")] == "single"
    assert all(t in ("single", "double", "triple", "deloc", "aromatic", "aromat") for t in types.values())
    readme = (BUNDLED / "README.txt").read_text()
    assert "sinlge" in readme and "HIS" in readme and "5.41" in readme and "LGPL" in readme
    assert "GNU LESSER GENERAL PUBLIC LICENSE" in (BUNDLED / "COPYING").read_text()


@pytest.mark.parametrize("code", REQUIRED)
def test_bundled_files_exist_and_keep_only_used_categories(code):
    path = BUNDLED / code[0].lower() / f"{code}.cif"
    doc = gemmi.cif.read(str(path))
    cats = {c for b in doc for c in b.get_mmcif_category_names()}
    assert cats <= KEPT
    assert "_chem_comp_atom." in cats


def test_build_script_reproduces_the_bundled_files(tmp_path):
    spec = importlib.util.spec_from_file_location("build_monlib", REPO / "scripts" / "build_monlib.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    assert mod.main(["--source", REFERENCE, "--dest", str(tmp_path)]) == 0
    built = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    shipped = sorted(p.relative_to(BUNDLED) for p in BUNDLED.rglob("*")
                     if p.is_file() and p.parts[-2] != "list")
    assert built == shipped
    for rel in built:
        assert (tmp_path / rel).read_bytes() == (BUNDLED / rel).read_bytes(), rel


def test_loading_the_bundled_library_is_fast():
    codes = {p.stem for p in BUNDLED.glob("?/*.cif")}
    assert len(codes) >= len(REQUIRED)
    monlib._read_dictionary_file.cache_clear()
    monlib._find_monomer_file.cache_clear()
    t = time.perf_counter()
    lib = MonomerLibrary()
    lib.load(codes)
    elapsed = time.perf_counter() - t
    assert elapsed < 1.0, elapsed
    assert lib.missing(codes) == []
    t = time.perf_counter()
    MonomerLibrary().load(codes)           # cached
    assert time.perf_counter() - t < 0.2


def _ideal_volume_by_coordinates(d, angles):
    """Chiral volume from coordinates placed with bond lengths d and angles (a2ca3, a1ca3, a1ca2)."""
    alpha, beta, gamma = np.radians(angles)
    u1 = np.array([1.0, 0, 0])
    u2 = np.array([math.cos(gamma), math.sin(gamma), 0])
    x = math.cos(beta)
    y = (math.cos(alpha) - x * math.cos(gamma)) / math.sin(gamma)
    u3 = np.array([x, y, -math.sqrt(1 - x * x - y * y)])
    return abs(np.dot(d[0] * u1, np.cross(d[1] * u2, d[2] * u3)))


def test_chiral_target_volume_from_template_geometry():
    lib = MonomerLibrary()
    lib.load({"ALA", "THR", "NAG"})
    ala = lib["ALA"]
    (c, a1, a2, a3), = ala.chir_idx.tolist()
    assert [ala.atoms[i] for i in (c, a1, a2, a3)] == ["CA", "N", "CB", "C"]
    assert ala.chir_sign.tolist() == [-1]
    # ALA (Engh & Huber): N-CA 1.458, CA-CB 1.521, CA-C 1.525; CB-CA-C 110.5, N-CA-C 111.2,
    # N-CA-CB 110.4
    expected = _ideal_volume_by_coordinates([1.458, 1.521, 1.525], [110.5, 111.2, 110.4])
    assert ala.chir_volume[0] == pytest.approx(expected, rel=1e-6)
    assert 2.3 < expected < 2.7
    for code in ("THR", "NAG"):
        assert np.all((lib[code].chir_volume > 2.0) & (lib[code].chir_volume < 3.0))


def test_unknown_residue_types_are_named_with_an_example():
    lib = MonomerLibrary()
    assert lib.missing({"ALA", "XYZ", "QQQ"}) == ["QQQ", "XYZ"]
    with pytest.raises(InputError) as err:
        lib.load({"ALA", "XYZ", "QQQ"}, examples={"XYZ": "A/XYZ301", "QQQ": "B/QQQ5"})
    msg = str(err.value)
    for part in ("XYZ (e.g. A/XYZ301)", "QQQ (e.g. B/QQQ5)", "--ligand", "AceDRG", "--monlib",
                 "CLIBD_MON"):
        assert part in msg
    assert "ALA" not in msg.split("(looked")[0]


def _ligand_text(src_code: str, new_code: str) -> str:
    """A dictionary for new_code made from a bundled monomer (for tests only)."""
    text = (BUNDLED / src_code[0].lower() / f"{src_code}.cif").read_text()
    text = re.sub(rf"(?m)^{src_code}(\s)", rf"{new_code}\1", text)
    return text.replace(f"data_comp_{src_code}", f"data_comp_{new_code}")


def test_ligand_file_with_several_blocks_takes_priority(tmp_path):
    xyz = _ligand_text("GLY", "XYZ")
    ala = (BUNDLED / "a" / "ALA.cif").read_text().replace("CA CB  single 1.521", "CA CB  single 1.600")
    assert "1.600" in ala
    # one file: a comp_list and two data_comp blocks
    body = re.sub(r"(?s)^.*?(data_comp_XYZ)", r"\1", xyz) + "\n" + re.sub(r"(?s)^.*?(data_comp_ALA)", r"\1", ala)
    path = tmp_path / "ligands.cif"
    path.write_text("data_comp_list\nloop_\n_chem_comp.id\n_chem_comp.group\nXYZ peptide\nALA L-peptide\n\n" + body)
    lib = MonomerLibrary()
    lib.load({"ALA", "XYZ", "GLY"}, [str(path)])
    assert lib["XYZ"].atoms == lib["GLY"].atoms
    assert lib["XYZ"].kind == "peptide"
    i, j = lib["ALA"].index["CA"], lib["ALA"].index["CB"]
    row = [k for k, (a, b) in enumerate(lib["ALA"].bond_idx.tolist()) if {a, b} == {i, j}][0]
    assert lib["ALA"].bond_value[row] == pytest.approx(1.600)
    assert lib["ALA"].source == str(path)


def test_chemical_component_file_is_rejected(tmp_path):
    ccd = tmp_path / "ATP_ccd.cif"
    ccd.write_text("data_XYZ\n_chem_comp.id XYZ\nloop_\n_chem_comp_atom.comp_id\n_chem_comp_atom.atom_id\n"
                   "_chem_comp_atom.type_symbol\nXYZ C1 C\nXYZ O1 O\n"
                   "loop_\n_chem_comp_bond.comp_id\n_chem_comp_bond.atom_id_1\n_chem_comp_bond.atom_id_2\n"
                   "_chem_comp_bond.value_order\nXYZ C1 O1 SING\n")
    with pytest.raises(InputError, match="AceDRG"):
        MonomerLibrary().load({"XYZ"}, [str(ccd)])
    with pytest.raises(InputError, match="not found"):
        MonomerLibrary().load({"XYZ"}, [str(tmp_path / "missing.cif")])


def _small_library(root: Path, codes, with_list: bool = False, edit=None) -> Path:
    for code in codes:
        dst = root / code[0].lower() / f"{code}.cif"
        dst.parent.mkdir(parents=True, exist_ok=True)
        text = (BUNDLED / code[0].lower() / f"{code}.cif").read_text()
        dst.write_text(edit(code, text) if edit else text)
    if with_list:
        (root / "list").mkdir()
        (root / "list" / "mon_lib_list.cif").write_text("data_comp_list\n_chem_comp.id ALA\n")
    return root


def test_monlib_directory_precedence(tmp_path, monkeypatch):
    env_dir = _small_library(tmp_path / "env", ["ALA"])
    cli_dir = _small_library(tmp_path / "cli", ["ALA"], with_list=True)
    monkeypatch.delenv("CLIBD_MON", raising=False)
    assert resolve_monlib_dir(None) == bundled_monlib_dir()
    monkeypatch.setenv("CLIBD_MON", str(env_dir))
    assert resolve_monlib_dir(None) == str(env_dir.resolve())
    assert resolve_monlib_dir(str(cli_dir)) == str(cli_dir.resolve())
    assert MonomerLibrary().directory == str(env_dir.resolve())
    monkeypatch.setenv("CLIBD_MON", "")
    assert resolve_monlib_dir(None) == bundled_monlib_dir()


def test_invalid_monlib_directories(tmp_path, monkeypatch):
    monkeypatch.delenv("CLIBD_MON", raising=False)
    with pytest.raises(InputError, match="does not exist"):
        resolve_monlib_dir(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no monomer files"):
        resolve_monlib_dir(str(tmp_path / "empty"))
    (tmp_path / "file.cif").write_text("data_x\n")
    with pytest.raises(InputError, match="not a directory"):
        resolve_monlib_dir(str(tmp_path / "file.cif"))
    monkeypatch.setenv("CLIBD_MON", str(tmp_path / "nowhere"))
    with pytest.raises(InputError, match="CLIBD_MON"):
        MonomerLibrary()


@pytest.mark.parametrize("with_list", [False, True])
def test_user_library_uses_its_monomers_and_our_links(tmp_path, with_list):
    root = _small_library(tmp_path / "lib", ["ALA", "GLY"], with_list=with_list)
    lib = MonomerLibrary(str(root))
    lib.load({"ALA", "GLY"})
    assert lib["ALA"].source.startswith(str(root.resolve()))
    assert lib.links["TRANS"].bonds[0][2] == pytest.approx(1.329)
    assert lib.missing({"SER"}) == ["SER"]


def test_links_table_values():
    links = MonomerLibrary().links
    trans = links["TRANS"]
    assert trans.bonds == [(("C", 1), ("N", 2), 1.329, 0.014)]
    ang = {tuple(a[:3]): a[3] for a in trans.angles}
    assert ang[(("CA", 1), ("C", 1), ("N", 2))] == 116.2
    assert ang[(("O", 1), ("C", 1), ("N", 2))] == 123.0
    assert ang[(("C", 1), ("N", 2), ("CA", 2))] == 121.7
    assert trans.torsions[0][4:] == (180.0, 5.0, 1)
    assert links["CIS"].torsions[0][4:] == (0.0, 5.0, 1)
    assert [a for a, _ in trans.planes["peptide"]] == [("CA", 1), ("C", 1), ("O", 1), ("N", 2), ("CA", 2)]
    for name in ("PTRANS", "PCIS"):
        assert any(a[:3] == (("C", 1), ("N", 2), ("CD", 2)) for a in links[name].angles)
    p = links["p"]
    assert p.bonds[0][:3] == (("O3'", 1), ("P", 2), 1.607)
    pang = {(a[0][0], a[1][0], a[2][0]): a[3] for a in p.angles}
    assert pang[("C3'", "O3'", "P")] == 120.2 and pang[("O3'", "P", "O5'")] == 104.0
    assert 108.0 <= pang[("O3'", "P", "OP1")] < 109.0 and 108.0 <= pang[("O3'", "P", "OP2")] < 109.0
    assert links["SS"].bonds[0][2] == 2.031 and links["SS"].angles[0][3] == 104.2
    assert links["NAG-ASN"].bonds[0][:3] == (("ND2", 1), ("C1", 2), 1.45)
    assert links["BETA1-4"].bonds[0][:3] == (("O4", 1), ("C1", 2), 1.43)
    coo = links["COO"]
    assert coo.kind == "mod" and coo.bonds[0][:3] == (("C", 1), ("OXT", 1), 1.231)
    cang = {a[0][0]: a[3] for a in coo.angles}
    assert cang == {"CA": 118.0, "O": 123.0}
    assert len(coo.planes["carboxy"]) == 4
    assert links["NH3"].kind == "mod" and not links["NH3"].bonds


def test_energy_types_give_the_intended_contact_distances():
    e = MonomerLibrary().energy
    r = {el: e.lookup(t, el)[0] for t, el in [("CH1", "C"), ("NH1", "N"), ("O", "O"), ("S", "S")]}
    assert r["C"] + r["C"] == pytest.approx(3.4, abs=0.05)
    assert r["C"] + r["N"] == pytest.approx(3.25, abs=0.05)
    assert r["C"] + r["O"] == pytest.approx(3.2, abs=0.05)
    assert r["N"] + r["N"] == pytest.approx(3.1, abs=0.06)
    assert r["N"] + r["O"] == pytest.approx(2.9, abs=0.12)
    assert r["O"] + r["O"] == pytest.approx(3.0, abs=0.05)
    for el in "CNO":
        assert r["S"] + r[el] == pytest.approx(r["C"] + r[el] + 0.2, abs=0.01)
    assert e.hbond_distance == pytest.approx(2.7)
    # donors and acceptors
    assert e.lookup("NH1", "N")[1] == 1 and e.lookup("O", "O")[1] == 2 and e.lookup("OH1", "O")[1] == 3
    assert e.lookup("CH2", "C")[1] == 0
    assert e.overrides[("HOH", "O")] == 3


def test_every_energy_type_of_the_bundled_monomers_is_tabulated():
    e = MonomerLibrary().energy
    missing = set()
    for path in BUNDLED.glob("?/*.cif"):
        block = gemmi.cif.read(str(path))[-1]
        for row in block.find("_chem_comp_atom.", ["type_symbol", "type_energy"]):
            if row.str(0) not in ("H", "D") and row.str(1).upper() not in e.radius:
                missing.add((path.stem, row.str(1)))
    assert not missing
    for t in ("C", "CH1", "CH2", "CH3", "CR1", "CR5", "CR6", "CR15", "CR16", "CR56", "CSP", "NH1", "NH2",
              "NH3", "NC1", "NC2", "NR5", "NR15", "NR16", "NR56", "NRD5", "NRD6", "N", "NT", "NT3", "O",
              "OH1", "OC", "O2", "OP", "OS", "S", "S1", "SH1", "P", "MG", "ZN", "CA", "NA", "CL", "K",
              "MN", "FE"):
        assert t in e.radius and t in e.role, t
