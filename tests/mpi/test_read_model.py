"""The model read once: rank 0 parses the file and the other ranks receive the same Model (its
arrays and its gemmi Structure); a bad file is the same InputError on every rank. The restraints
built once: the last rank builds them and every rank gets the same arrays; a residue without a
dictionary is the same InputError on every rank. Run under mpiexec with K = 1, 2, 3, 5 ranks
(tests/test_mpi_launch.py)."""
from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from hpcrefine import datasets
from hpcrefine.errors import InputError
from hpcrefine.modelio import read_model
from hpcrefine.parallel.distributed import bcast_bytes, made_once

WORLD = MPI.COMM_WORLD


def test_every_rank_gets_the_model_rank_0_read():
    if WORLD.Get_rank() == 0:
        path = datasets.fetch(["adk_closed"])["adk_closed"]
    path = WORLD.bcast(path if WORLD.Get_rank() == 0 else None, root=0)
    shared = read_model(path, WORLD)
    own = read_model(path)
    for name in ("xyz", "b", "occ", "element", "atom_name", "res_name", "chain", "res_index",
                 "altloc", "res_chain", "res_seqid", "res_label_seq", "res_names",
                 "res_is_polymer", "res_first_atom"):
        assert np.array_equal(getattr(shared, name), getattr(own, name)), name
    assert shared.st[0].count_atom_sites() == own.st[0].count_atom_sites() == shared.n_atoms
    assert [ch.name for ch in shared.st[0]] == [ch.name for ch in own.st[0]]
    assert shared.st.cell.parameters == own.st.cell.parameters
    assert shared.st.spacegroup_hm == own.st.spacegroup_hm


def test_a_bad_model_is_one_error_on_every_rank(tmp_path_factory):
    path = str(tmp_path_factory.getbasetemp() / "no-such-model.cif")
    with pytest.raises(InputError, match="model file not found"):
        read_model(path, WORLD)


def _adk_path():
    path = datasets.fetch(["adk_closed"])["adk_closed"] if WORLD.Get_rank() == 0 else None
    return WORLD.bcast(path, root=0)


def test_every_rank_gets_the_restraints_the_last_rank_built():
    from dataclasses import fields

    from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
    from hpcrefine.refine import _covalent_restraints
    from hpcrefine.topology import build_restraints

    model = read_model(_adk_path(), WORLD)
    lib_dir, shared = _covalent_restraints(model, None, [], WORLD)
    own = build_restraints(model, MonomerLibrary(resolve_monlib_dir(None)))
    assert lib_dir == resolve_monlib_dir(None)
    assert shared.counts() == own.counts() and shared.counts()["bonds"] > 1500
    for f in fields(own):
        a, b = getattr(shared, f.name), getattr(own, f.name)
        assert a.dtype == b.dtype and np.array_equal(a, b), f.name


def test_a_residue_without_restraints_is_one_error_on_every_rank(tmp_path_factory):
    from hpcrefine.refine import _covalent_restraints

    model = read_model(_adk_path(), WORLD)
    model.res_names = model.res_names.copy()
    model.res_names[100] = "XYZ"
    with pytest.raises(InputError, match="XYZ.*--ligand|--ligand.*XYZ"):
        _covalent_restraints(model, None, [], WORLD)
    with pytest.raises(InputError, match="monomer library"):
        _covalent_restraints(model, str(tmp_path_factory.getbasetemp() / "no-such-dir"), [], WORLD)


def test_made_once_failing_elsewhere_than_input():
    """A failure that is not an input error: the making rank raises it with its traceback, the
    others an InputError naming that rank, and nobody waits for ever."""
    last = WORLD.Get_size() - 1

    def make():
        raise ZeroDivisionError("boom")
    if WORLD.Get_rank() == last:
        with pytest.raises(ZeroDivisionError, match="boom"):
            made_once(WORLD, make, root=last, what="dividing")
    else:
        with pytest.raises(InputError, match=f"rank {last} failed dividing"):
            made_once(WORLD, make, root=last, what="dividing")
    assert made_once(WORLD, lambda: {"n": WORLD.Get_size()}, root=last) == {"n": WORLD.Get_size()}


def test_made_once_sends_arrays_out_of_band_as_they_were():
    """made_once pickles with protocol 5: contiguous arrays are broadcast from their own memory
    and the others' arrays are made on the received memory; every array arrives equal, with its
    dtype and shape, writable, and a non-contiguous or empty one too."""
    last = WORLD.Get_size() - 1
    rng = np.random.default_rng(5)
    want = {"idx": rng.integers(0, 10**6, (50_001, 4)), "f": rng.normal(size=70_001).astype(np.float32),
            "strided": rng.normal(size=(300, 7))[:, ::2], "empty": np.zeros((0, 2), dtype=np.int64),
            "names": np.array(["CA", "N", "OXT"]), "n": 3}
    got = made_once(WORLD, lambda: want, root=last)
    for key in ("idx", "f", "strided", "empty", "names"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key
    assert got["n"] == 3
    if WORLD.Get_rank() != last:
        got["idx"][0, 0] = -1                   # the arrays are the receiver's own
        assert want["idx"][0, 0] != -1


def test_bytes_broadcast_whole():
    for n in (0, 1, 100_003):
        data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8).tobytes()
        got = bcast_bytes(WORLD, data if WORLD.Get_rank() == 0 else None)
        assert bytes(got) == data


def test_objects_sent_point_to_point():
    """parallel.distributed.send_object / recv_object: the last rank sends rank 0 a validation-
    sized result (numpy arrays in a dict) and an empty one."""
    from hpcrefine.parallel.distributed import recv_object, send_object

    last = WORLD.Get_size() - 1
    if last == 0:
        return
    rng = np.random.default_rng(11)
    payload = {"per_residue": {"cc": rng.normal(size=130_000)}, "name": "start", "n": 3}
    if WORLD.Get_rank() == last:
        send_object(WORLD, payload, 0, 77)
        send_object(WORLD, {}, 0, 77)
    elif WORLD.Get_rank() == 0:
        got = recv_object(WORLD, last, 77)
        assert got["name"] == "start" and got["n"] == 3
        assert np.array_equal(got["per_residue"]["cc"], payload["per_residue"]["cc"])
        assert recv_object(WORLD, last, 77) == {}

