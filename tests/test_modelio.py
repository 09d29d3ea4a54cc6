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
