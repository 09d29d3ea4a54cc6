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
from hpcrefine.parallel.mapstore import (MapStore, StoredRealSpaceTerm, blurred_key,
                                        prefetch_blurred_copy)

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
    # a map the maker lends is normalised in place, one it keeps is not touched: the same map
    kept, lent = _map(), _map()
    kept_term = StoredRealSpaceTerm(store, "kept", lambda: kept, origin, voxel, weight)
    lent_term = StoredRealSpaceTerm(store, "lent", lambda: lent, origin, voxel, weight, lends=True)
    assert np.array_equal(kept, _map()) and np.array_equal(kept_term.data, lent_term.data)
    assert np.array_equal(kept_term.data, plain.data)
    if WORLD.Get_rank() == 0:                         # the rank that made it
        assert np.array_equal(lent, plain.data)
    WORLD.Barrier()
    store.close()


def test_a_map_written_ahead_is_published_without_computing_again(shared_dir):
    """The master's prefetch writes the map in its own thread while the ranks go on (no
    collective); the publish that follows maps that file on every rank, bitwise the map that
    publish alone makes, and its compute is not called again. A prefetched blurred copy of a
    stored term equals blurred() made without it, also when written before the term exists. A
    failing prefetch fails the publish on every rank."""
    ctx = make_context(WORLD)
    store = MapStore(ctx, shared_dir)
    origin, voxel = np.array([1.0, -2.0, 0.5]), np.array([1.1, 1.1, 1.1])
    calls = []

    def compute():
        calls.append("ahead")
        return _map() * 3
    store.prefetch("thrice", compute)
    a = store.publish("thrice", lambda: calls.append("publish") or _map() * 3)
    assert np.array_equal(a, _map() * 3)
    counted = WORLD.allgather(calls)
    parallel = WORLD.Get_size() > 1
    # ahead on the master only (several ranks); with one rank nothing is written ahead
    assert counted[0] == (["ahead"] if parallel else ["publish"])
    assert all(c == [] for c in counted[1:])

    weight = np.ones(10)
    plain = StoredRealSpaceTerm(store, "p", _map, origin, voxel, weight).blurred(25.0)
    term = StoredRealSpaceTerm(store, "q", _map, origin, voxel, weight)
    term.prefetch_blurred(25.0)
    ahead = term.blurred(25.0)
    assert np.array_equal(np.asarray(ahead.data), np.asarray(plain.data))
    # a copy written ahead before its term exists (the half maps' blurred copies while the
    # master makes the plain maps): the term's blurred() finds it, computed once, the same bits
    made = []

    def blur_raw(b):
        made.append(b)
        return StoredRealSpaceTerm(store, "p", _map, origin, voxel, weight).blurred(b).data * 1.0
    prefetch_blurred_copy(store, "r", blur_raw, 25.0)
    prefetch_blurred_copy(store, "r", blur_raw, 0.0)          # nothing to write at no blur
    early = StoredRealSpaceTerm(store, "r", _map, origin, voxel, weight, blur_raw).blurred(25.0)
    assert store.has(blurred_key("r", 25.0)) and not store.has(blurred_key("r", 0.0))
    assert WORLD.allgather(made)[0] == [25.0] and all(m == [] for m in WORLD.allgather(made)[1:])
    late = StoredRealSpaceTerm(store, "s", _map, origin, voxel, weight, blur_raw).blurred(25.0)
    assert np.array_equal(np.asarray(early.data), np.asarray(late.data))
    assert np.allclose(early.data, plain.data, atol=1e-5)

    def broken():
        raise ValueError("deliberate")
    store.prefetch("broken_ahead", broken)
    with pytest.raises((ValueError, RuntimeError)):
        store.publish("broken_ahead", broken)
    WORLD.Barrier()
    store.close()


def _mapped_kb(path: str) -> int:
    """This process's resident kB of the mappings of file `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:      # a mapping's first line
                inside = len(head) >= 6 and os.path.realpath(head[5]) == os.path.realpath(path)
            elif inside and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_a_rank_reads_only_the_sub_grid_around_its_atoms(shared_dir):
    """A worker's data term (LocalRealSpaceTerm over a stored map) reads the box around its atoms
    from the file into memory of its own, never the mapping, gives bitwise the whole map's
    target, and reads again when its atoms leave the box."""
    from hpcrefine.core.density import real_space_target
    from hpcrefine.parallel.distributed import EVALUATION_TOTALS, SUBGRID_MARGIN, LocalRealSpaceTerm

    ctx = make_context(WORLD)
    store = MapStore(ctx, shared_dir)
    rng = np.random.default_rng(11)
    shape = (48, 56, 40)
    big = rng.normal(size=shape).astype(np.float32)
    origin, voxel = np.array([-3.0, 2.0, 1.0]), np.array([1.2, 1.1, 1.0])
    n = 90
    weight = rng.uniform(0.5, 2.0, n)
    plain = RealSpaceTerm(big, origin, voxel, weight)
    stored = StoredRealSpaceTerm(store, "big", lambda: big, origin, voxel, weight)
    # every rank owns a cluster of atoms, 10 voxels across, in its own corner of the map
    rank = WORLD.Get_rank()
    xyz = origin + rng.uniform(4, 14, size=(n, 3)) * voxel
    atoms = np.arange(rank % 3, n, 3)
    xyz[atoms] += (rank % 2) * 12 * voxel
    local = LocalRealSpaceTerm(stored, atoms)

    def both(x):
        f_whole, g_atoms = real_space_target(plain.data, origin, voxel, x[atoms], weight[atoms],
                                             scale=2.5)
        g_whole = np.zeros((n, 3))
        g_whole[atoms] = g_atoms
        g = np.zeros((n, 3))
        f = local.accumulate(x, g, 2.5)
        assert f == f_whole and np.array_equal(g, g_whole)
        assert not np.any(g[np.setdiff1d(np.arange(n), atoms)])

    reads = EVALUATION_TOTALS.subgrid_reads
    both(xyz)
    parallel = WORLD.Get_size() > 1
    if parallel:
        assert EVALUATION_TOTALS.subgrid_reads == reads + 1
        assert local.sub.size < 0.25 * big.size and local.sub.flags.owndata
    else:
        assert local.sub is plain.data or local.sub.size == big.size     # one rank: the map in place
    # moved less than the margin: the same sub-grid; moved beyond it: read again
    both(xyz + 0.5 * SUBGRID_MARGIN)
    assert EVALUATION_TOTALS.subgrid_reads == reads + parallel
    moved = xyz + np.array([2.0, 1.0, -1.5]) * SUBGRID_MARGIN
    both(moved)
    assert EVALUATION_TOTALS.subgrid_reads == reads + 2 * parallel
    # the next minimisation of the same map, its atoms inside the kept sub-grid: nothing read
    local = LocalRealSpaceTerm(stored, atoms)
    both(moved + 0.3)
    assert EVALUATION_TOTALS.subgrid_reads == reads + 2 * parallel
    # another map: read, and the kept one let go
    other = StoredRealSpaceTerm(store, "big2", lambda: big[::-1].copy(), origin, voxel, weight)
    local, plain = LocalRealSpaceTerm(other, atoms), RealSpaceTerm(big[::-1].copy(), origin, voxel, weight)
    both(moved)
    assert EVALUATION_TOTALS.subgrid_reads == reads + 3 * parallel
    if parallel:
        assert store._last_box[0] == "big2"
        # nothing of the map files is resident in this process: their pages were read, not mapped
        assert _mapped_kb(store._path("big")) == 0 and _mapped_kb(store._path("big2")) == 0
    WORLD.Barrier()
    store.close()


def test_the_store_goes_to_memory_on_one_node_when_it_has_room(tmp_path, monkeypatch):
    """store_dir: every rank on this node, /dev/shm with room -> /dev/shm/hpcrefine-<uid>-<name>,
    the same on every rank; no room (maps too large) or $HPCREFINE_MAP_DIR -> not there; the
    store written there holds the maps, close() says how many bytes and removes them."""
    from hpcrefine.parallel import mapstore

    monkeypatch.delenv("HPCREFINE_MAP_DIR", raising=False)
    ctx = make_context(WORLD)
    outdir = WORLD.bcast(str(tmp_path / "run") if WORLD.Get_rank() == 0 else None, root=0)
    small = mapstore.store_dir(outdir, ctx, 1000)
    every = WORLD.allgather(small)
    assert len(set(every)) == 1
    roomy = mapstore._room_in_memory(mapstore.SHM, mapstore.STORE_MAPS * 1000)
    if WORLD.Get_size() == 1:
        assert small == os.path.join(outdir, ".maps")          # one rank: maps stay in memory anyway
    elif WORLD.bcast(roomy, root=0):
        assert small.startswith(os.path.join(mapstore.SHM, f"hpcrefine-{os.getuid()}-"))
        assert small.endswith(mapstore._store_name(outdir))
    huge = mapstore.store_dir(outdir, ctx, 1 << 60)              # no memory filesystem holds that
    assert huge == os.path.join(outdir, ".maps")
    monkeypatch.setenv("HPCREFINE_MAP_DIR", str(tmp_path / "elsewhere"))
    assert mapstore.store_dir(outdir, ctx, 1000) == os.path.join(str(tmp_path / "elsewhere"),
                                                                  mapstore._store_name(outdir))
    store = MapStore(ctx, small)
    store.publish("m", _map)
    WORLD.Barrier()
    done = store.close()
    WORLD.Barrier()
    assert not os.path.exists(small)
    if ctx.is_master and WORLD.Get_size() > 1:
        assert done == {"directory": small, "maps": 1, "bytes": _map().nbytes, "keys": ["m"]}
    else:
        assert done["maps"] == 0 and done["keys"] == []
