"""Model output: mmCIF always, PDB only when the model fits the format."""
from __future__ import annotations

import logging

import gemmi

from hpcrefine.modelio import fits_pdb, read_model, updated_structure, write_model


def test_pdb_written_when_it_fits(adk_truth, tmp_path):
    model = read_model(adk_truth)
    paths = write_model(updated_structure(model, model.xyz + 1.0), str(tmp_path / "m"))
    assert [p[-4:] for p in paths] == [".cif", ".pdb"]
    back = read_model(paths[1])
    assert abs(back.xyz - model.xyz - 1.0).max() < 1e-3


def test_two_character_chain_ids_give_mmcif_only(adk_truth, tmp_path, caplog):
    model = read_model(adk_truth)
    model.st[0][0].name = "AB"
    ok, why = fits_pdb(model.st)
    assert not ok and "AB" in why
    with caplog.at_level(logging.INFO):
        paths = write_model(updated_structure(model, model.xyz), str(tmp_path / "m"))
    assert [p[-4:] for p in paths] == [".cif"]
    assert "not writing PDB format" in caplog.text
    assert gemmi.read_structure(paths[0])[0][0].name == "AB"


def test_too_many_atoms_for_pdb(adk_truth):
    st = gemmi.read_structure(adk_truth)
    model = st[0]
    template = model[0].clone()                  # a copy: adding chains moves the originals
    for k in range(1, 61):                       # 61 copies of 1656 atoms: 101,016 atoms
        c = template.clone()
        c.name = f"C{k}"
        model.add_chain(c)
    ok, why = fits_pdb(st)
    assert not ok and "99999" in why


def test_flattened_model_names_every_atom(tmp_path):
    """model_from_structure: hydrogens removed, elements upper case (SE), no altloc as "",
    altlocs kept, each atom's residue name, chain and residue index repeated from its residue,
    and the residues' first atoms."""
    import numpy as np

    from hpcrefine.modelio import model_from_structure

    pdb = (
        "ATOM      1  N   MSE A   1      11.000  12.000  13.000  1.00 20.00           N\n"
        "ATOM      2  H   MSE A   1      11.500  12.500  13.500  1.00 20.00           H\n"
        "ATOM      3  CA AMSE A   1      12.000  12.000  13.000  0.60 21.00           C\n"
        "ATOM      4  CA BMSE A   1      12.100  12.100  13.100  0.40 22.00           C\n"
        "ATOM      5 SE   MSE A   1      13.000  14.000  15.000  1.00 30.00          SE\n"
        "ATOM      6  N   GLY B   7      21.000  22.000  23.000  1.00 25.00           N\n"
        "ATOM      7  CA  GLY B   7      22.000  22.000  23.000  1.00 26.00           C\n"
        "END\n")
    path = tmp_path / "m.pdb"
    path.write_text(pdb)
    m = model_from_structure(gemmi.read_structure(str(path)))
    assert m.n_atoms == 6 and m.st[0].count_atom_sites() == 6
    assert m.element.tolist() == ["N", "C", "C", "SE", "N", "C"]
    assert m.atom_name.tolist() == ["N", "CA", "CA", "SE", "N", "CA"]
    assert m.altloc.tolist() == ["", "A", "B", "", "", ""]
    assert m.res_name.tolist() == ["MSE"] * 4 + ["GLY"] * 2
    assert m.chain.tolist() == ["A"] * 4 + ["B"] * 2
    assert m.res_index.tolist() == [0, 0, 0, 0, 1, 1] and m.res_first_atom.tolist() == [0, 4, 6]
    assert m.res_chain.tolist() == ["A", "B"] and m.res_seqid.tolist() == ["1", "7"]
    assert m.res_names.tolist() == ["MSE", "GLY"]
    assert np.allclose(m.xyz[3], [13.0, 14.0, 15.0]) and m.xyz.dtype == np.float64
    assert m.b.tolist() == [20.0, 21.0, 22.0, 30.0, 25.0, 26.0]
    assert np.allclose(m.occ, [1.0, 0.6, 0.4, 1.0, 1.0, 1.0])
