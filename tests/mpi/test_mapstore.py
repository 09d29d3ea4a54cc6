"""The map store: maps computed once by the master, memory-mapped read-only by every rank, and the
stored fast target equal to the in-memory one. Run under mpiexec with K = 1, 2, 3, 5 ranks
(tests/test_mpi_launch.py)."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import pytest
from mpi4py import MPI

from hpcrefine.engine import RealSpaceTerm
from hpcrefine.parallel.context import make_context
from hpcrefine.parallel.mapstore import MapStore, StoredRealSpaceTerm

WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def shared_dir():
    """A directory every rank sees (made by rank 0), removed at the end."""
    path = tempfile.mkdtemp(prefix="hpcrefine-mapstore-") if WORLD.Get_rank() == 0 else None
    path = WORLD.bcast(path, root=0)
    yield os.path.join(path, "maps")
    WORLD.Barrier()
    if WORLD.Get_rank() == 0:
        shutil.rmtree(path, ignore_errors=True)


def _map():
    rng = np.random.default_rng(3)
    data = rng.normal(size=(24, 28, 20)).astype(np.float32)
    zz, yy, xx = np.meshgrid(*(np.arange(s) for s in data.shape), indexing="ij")
    data += 3 * np.exp(-((zz - 12) ** 2 + (yy - 14) ** 2 + (xx - 10) ** 2) / 20.0).astype(np.float32)
    return data


def test_the_master_computes_once_and_every_rank_maps_the_same_map(shared_dir):
    ctx = make_context(WORLD)
    store = MapStore(ctx, shared_dir)
    calls = []

    def compute():
        calls.append(WORLD.Get_rank())
        return _map() * 2
    a = store.publish("twice", compute)
    again = store.publish("twice", compute)          # published: only mapped again
    assert np.array_equal(a, _map() * 2) and np.array_equal(again, a)
    assert not a.flags.writeable
    n_calls = WORLD.allreduce(len(calls))
    assert n_calls == 1 and (calls == [0] or not calls)
    if WORLD.Get_size() > 1:
        assert os.path.exists(os.path.join(shared_dir, "twice.npy"))
    WORLD.Barrier()
    store.close()
    WORLD.Barrier()
    assert not os.path.exists(shared_dir)


def test_a_failure_on_the_master_reaches_every_rank(shared_dir):
    ctx = make_context(WORLD)
    store = MapStore(ctx, shared_dir)

    def broken():
        raise ValueError("deliberate")
    with pytest.raises((ValueError, RuntimeError)):
        store.publish("broken", broken)
    WORLD.Barrier()
    store.close()


def test_stored_fast_target_equals_the_in_memory_one(shared_dir):
    ctx = make_context(WORLD)
    store = MapStore(ctx, shared_dir)
    origin, voxel = np.array([1.0, -2.0, 0.5]), np.array([1.1, 1.1, 1.1])
    rng = np.random.default_rng(8)
    xyz = origin + rng.uniform(3, 18, size=(50, 3))
    weight = np.ones(50)
    plain = RealSpaceTerm(_map(), origin, voxel, weight)
    stored = StoredRealSpaceTerm(store, "m", _map, origin, voxel, weight)
    f0, g0 = plain.target(xyz)
    f1, g1 = stored.target(xyz)                       # collective: the master evaluates
    assert f1 == f0 and np.array_equal(g1, g0)
    fb0, gb0 = plain.blurred(30.0).target(xyz)
    fb1, gb1 = stored.blurred(30.0).target(xyz)
    assert fb1 == pytest.approx(fb0, rel=1e-6) and np.allclose(gb1, gb0, rtol=1e-5, atol=1e-8)
    # a blurred map published once is mapped, not recomputed, by any rank alone
    assert store.has("m_b30")
    WORLD.Barrier()
    store.close()
