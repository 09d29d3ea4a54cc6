"""Maps prepared once by the master and memory-mapped, read-only, by every rank.

The maps a refinement reads (the FSC-weighted map, each half map low-passed, their normalised and
blurred versions) come out of transforms over the whole box. Before, every rank computed its own
copies, so every worker held several full-box arrays (1 map = 442 MB at 480^3) whatever share of
the model it refined. Now the master computes each map once and writes it to a file of the store
(store_dir: /dev/shm when every rank runs on one node and it has room, else a directory under the
run's output folder, or $HPCREFINE_MAP_DIR, which must be readable by every rank: a shared
filesystem on a cluster), and every rank maps the file
read-only. A worker's data term in a minimisation reads from the file (read_box, not through the
mapping) only the sub-grid around its own atoms (distributed.LocalRealSpaceTerm: its share of the
model, a box of decompose.spatial_parts in the coordinate minimisation), into memory of its own;
the store keeps the last sub-grid a rank read for the next minimisations of the same map
(sub_grid). The page cache holds one copy of the file per node.

Collective use: publish(key, compute) must be called by every rank of the world (the driver that
all ranks run); the master computes and writes while the workers wait without spinning, then all
ranks map the file. A key published before is mapped again without recomputing (`has`, `get`),
which any rank may do alone. With one rank, nothing is written: maps stay in memory.

StoredRealSpaceTerm is the fast real-space target (engine.RealSpaceTerm) over a stored map: its
blurred copies are stored too, and its whole-model evaluation (`target`, used for the weight
choices of the driver) is computed by the master and broadcast (collective), so no worker reads
the whole map.
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import threading

import numpy as np

from ..core.density import blur_map, normalise_map
from ..engine import RealSpaceTerm


# a run stores the full map, both half maps' cropped coefficients, each half map low-passed and
# its blurred copies, and the final map's blurred copies (9 files, 3.4 GB, in the million-atom
# runs on a 480^3 box); /dev/shm is used only when it has room for this many full-box maps
STORE_MAPS = 12
SHM = "/dev/shm"


def _store_name(outdir: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.abspath(outdir).strip("/")) or "run"


def _room_in_memory(path: str, need: int) -> bool:
    """Whether the memory filesystem `path` can take `need` bytes: its own free space, and at
    most half of the memory the node has available."""
    from .budget import meminfo_available

    try:
        st = os.statvfs(path)
        if not os.access(path, os.W_OK):
            return False
    except OSError:
        return False
    available = meminfo_available()
    return available is not None and st.f_bavail * st.f_frsize >= need and available >= 2 * need


def store_dir(outdir: str, ctx=None, map_bytes: int = 0) -> str:
    """Where the run's maps go (collective over ctx's world when given): $HPCREFINE_MAP_DIR/<output
    folder name> when set; else, when every rank runs on this node and /dev/shm has room for
    STORE_MAPS maps of map_bytes, /dev/shm/hpcrefine-<uid>-<output folder name>, in memory; else
    OUTDIR/.maps, which every node of a cluster sees when the output folder does.

    In memory, the master's writes of 480^3 maps took 0.2 s against 3.5 s into new files on this
    machine's disk filesystem, and no pages go to the disk."""
    base = os.environ.get("HPCREFINE_MAP_DIR")
    if base:
        return os.path.join(base, _store_name(outdir))
    if ctx is not None and ctx.size > 1:
        from mpi4py import MPI

        node = ctx.world.Split_type(MPI.COMM_TYPE_SHARED)
        one_node = node.Get_size() == ctx.size
        node.Free()
        if one_node:
            from .distributed import made_once

            def in_memory():
                if _room_in_memory(SHM, STORE_MAPS * int(map_bytes)):
                    return os.path.join(SHM, f"hpcrefine-{os.getuid()}-{_store_name(outdir)}")
                return None
            # the master's choice on every rank (free memory may look different to each)
            choice = made_once(ctx.world, in_memory, what="choosing where the maps go")
            if choice is not None:
                return choice
    return os.path.join(outdir, ".maps")


class MapStore:
    """Full-box float32 maps computed by the master and shared through memory-mapped files.

    ctx: the run's parallel.context.Context (None or one rank: maps are kept in memory and
    nothing is written). directory: where the files go (store_dir)."""

    def __init__(self, ctx, directory: str):
        self.ctx = ctx
        self.directory = directory
        self.parallel = ctx is not None and ctx.size > 1
        self._memory: dict[str, np.ndarray] = {}
        self._published: set[str] = set()
        self._last_box = None          # (key, lo, hi, array): the sub-grid sub_grid read last
        self._ahead: dict = {}         # key -> Future of a map the master is writing ahead (prefetch)
        self._pool = None
        self.written: list[tuple[str, int]] = []   # (key, bytes) of each map the master wrote
        # held by a map written ahead while it is made, and by the master's other full-box work
        # (halfset's compare steps): the two never hold their full-box temporaries at once
        self.heavy = threading.Lock()
        if self.parallel and ctx.is_master:
            shutil.rmtree(directory, ignore_errors=True)      # maps of an earlier run
            os.makedirs(directory)

    def _path(self, key: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", key):
            raise ValueError(f"bad map key {key!r}")
        return os.path.join(self.directory, key + ".npy")

    def has(self, key: str) -> bool:
        return key in self._published or key in self._memory

    def get(self, key: str) -> np.ndarray:
        """A published map (read-only; memory-mapped when parallel)."""
        if key in self._memory:
            return self._memory[key]
        if key not in self._published:
            raise KeyError(f"map {key!r} was not published")
        path = self._path(key)
        if not os.path.exists(path):
            import socket
            raise RuntimeError(f"rank {self.ctx.rank} on {socket.gethostname()} cannot see {path}, which "
                               "the master wrote: put the output folder on a filesystem every node "
                               "sees, or set HPCREFINE_MAP_DIR to one")
        return np.asarray(np.load(path, mmap_mode="r"))     # an ndarray view of the mapping

    def read_box(self, key: str, lo, hi) -> np.ndarray:
        """Voxels lo..hi - 1 ((x, y, z) indices) of a map published to a file, as an array of
        this process's own, (nz, ny, nx) of the box. Read from the file, not through a mapping:
        only the box stays in this process's memory (the file's pages go through the node's page
        cache), one plane's rows at a time."""
        if key not in self._published:
            raise KeyError(f"map {key!r} was not published to a file")
        (i0, j0, k0), (i1, j1, k1) = (int(v) for v in lo), (int(v) for v in hi)
        with open(self._path(key), "rb", buffering=0) as fh:
            version = np.lib.format.read_magic(fh)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = header(fh)
            offset = fh.tell()
            nz, ny, nx = shape
            if fortran or not (0 <= i0 < i1 <= nx and 0 <= j0 < j1 <= ny and 0 <= k0 < k1 <= nz):
                raise ValueError(f"box {lo}..{hi} is not inside map {key!r} of {nx} x {ny} x {nz}")
            out = np.empty((k1 - k0, j1 - j0, i1 - i0), dtype=dtype)
            rows = np.empty((j1 - j0, nx), dtype=dtype)
            view = memoryview(rows).cast("B")
            for k in range(k0, k1):
                pos = offset + (k * ny + j0) * nx * dtype.itemsize
                done = 0
                while done < len(view):
                    got = os.preadv(fh.fileno(), [view[done:]], pos + done)
                    if got <= 0:
                        raise OSError(f"the file of map {key!r} ended early")
                    done += got
                out[k - k0] = rows[:, i0:i1]
        return out

    def sub_grid(self, key: str, lo, hi, need_lo=None, need_hi=None) -> tuple[np.ndarray, np.ndarray, bool]:
        """(lo', array, read): a sub-grid of a published map from voxel lo' ((x, y, z) indices)
        on, read now (read: True) with voxels lo..hi - 1. The last sub-grid read is kept and
        given again (read: False) while it holds voxels need_lo..need_hi - 1 (default lo, hi):
        the minimisations of one map in a row (the weight trials, the half-set tasks of one half)
        read it once. Another is read (read_box) after letting go of it, so that at most one is
        held here."""
        lo = np.asarray(lo, dtype=np.int64)
        hi = np.asarray(hi, dtype=np.int64)
        need_lo = lo if need_lo is None else np.asarray(need_lo, dtype=np.int64)
        need_hi = hi if need_hi is None else np.asarray(need_hi, dtype=np.int64)
        last = self._last_box
        if (last is not None and last[0] == key and np.all(last[1] <= need_lo)
                and np.all(need_hi <= last[2])):
            return last[1], last[3], False
        self._last_box = None
        box = self.read_box(key, lo, hi)
        self._last_box = (key, lo, hi, box)
        return lo, box, True

    def _write(self, key: str, compute, dtype) -> None:
        """The master: compute the map and write its file (under a temporary name until complete)."""
        path = self._path(key)
        tmp = path + ".part"
        a = np.ascontiguousarray(compute(), dtype=dtype)
        with open(tmp, "wb") as fh:
            np.save(fh, a)
        self.written.append((key, a.nbytes))
        del a
        os.replace(tmp, path)

    def prefetch(self, key: str, compute, dtype=np.float32) -> None:
        """The master (alone, not collective) starts computing and writing map `key` in a thread of
        its own while it waits for the workers (the half-set stage), so that the publish(key) to
        come finds the file written instead of making the workers wait for it. The same compute
        publish would run: the file holds the same bits. Does nothing on other ranks, with one
        rank, or for a key published or under way."""
        if not (self.parallel and self.ctx.is_master) or self.has(key) or key in self._ahead:
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor
            # one thread: the maps are made one after another (numpy and the transforms let go
            # of the interpreter lock, so the master's polling thread goes on meanwhile)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hpcrefine-maps")
        self._ahead[key] = self._pool.submit(self._write_alone, key, compute, dtype)

    def _write_alone(self, key: str, compute, dtype) -> None:
        with self.heavy:
            self._write(key, compute, dtype)

    def publish(self, key: str, compute, dtype=np.float32) -> np.ndarray:
        """The map compute() returns, computed once by the master (collective over the world
        when parallel; an already published key is only mapped). Returns it read-only, as
        dtype (float32; complex64 for Fourier coefficients)."""
        if self.has(key):
            return self.get(key)
        if not self.parallel:
            a = np.asarray(compute(), dtype=dtype)
            a.flags.writeable = False
            self._memory[key] = a
            return a
        ctx = self.ctx
        failure = None
        if ctx.is_master:
            ahead = self._ahead.pop(key, None)
            try:
                if ahead is not None:
                    ahead.result()              # written ahead (prefetch): wait for it if needed
                else:
                    self._write(key, compute, dtype)
            except BaseException as exc:        # tell the workers before raising
                failure = exc
            flag = np.array([0 if failure is None else 1], dtype=np.int32)
        else:
            flag = np.zeros(1, dtype=np.int32)
        # the workers wait here, sleeping between polls, while the master computes and writes (a
        # map of a large box takes seconds to tens of seconds); then all learn whether it worked
        _rendezvous(ctx)
        ctx.world.Bcast(flag, root=0)
        if failure is not None:
            raise failure
        if flag[0]:
            raise RuntimeError(f"the master could not prepare map {key!r}; see its error")
        self._published.add(key)
        return self.get(key)

    def close(self) -> dict:
        """Remove the files (the master; the others only forget them), after the maps still
        being written ahead are done (their errors do not matter any more). Returns where the
        maps were and how many bytes the master wrote (report.json's map_store)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._ahead.clear()
        self._memory.clear()
        self._published.clear()
        self._last_box = None
        if self.parallel and self.ctx.is_master:
            shutil.rmtree(self.directory, ignore_errors=True)
        return {"directory": self.directory, "maps": len(self.written),
                "bytes": int(sum(n for _, n in self.written)), "keys": sorted(k for k, _ in self.written)}


class ScaledBlur(RealSpaceTerm):
    """The copy of a StoredRealSpaceTerm's map blurred by b_extra, not published: its target is
    read only through the map summed over fixed NCS operators (ncs.SymmetricTarget), which is
    made by blurring the parent's summed map on its box and multiplying it by `scale`, the
    ratio of the standard deviations of the parent's raw map and of its blurred copy
    (ncs.AveragedMap.blurred_from: a blur is isotropic and keeps the mean, so the sum of the
    normalised blurred map is the blurred sum of the normalised map times that ratio). The
    master then neither transforms the whole box for it nor writes it, while the workers wait
    (half maps at a million atoms: two 480^3 maps). Anything else that reads its map makes it
    in its own process, once (blur_map of the parent's map, normalised)."""

    def __init__(self, parent: StoredRealSpaceTerm, b_extra: float, scale: float):
        self.store = parent.store
        self.key = blurred_key(parent.key, b_extra)
        self.origin, self.voxel, self.atom_weight = parent.origin, parent.voxel, parent.atom_weight
        self.blur_of = (parent, b_extra)
        self.blur_scale = float(scale)
        self._data = None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            parent, b_extra = self.blur_of
            self._data = normalise_map(blur_map(parent.data, parent.voxel, b_extra))
        return self._data

    def box_reader(self):
        return None                     # in memory, not in the store


def _normalised(compute_raw, lends: bool = False) -> np.ndarray:
    """The map compute_raw() makes, as float32, normalised (what a StoredRealSpaceTerm stores),
    in a new array; in place when `lends` says that compute_raw gives an array of its own that
    nothing else reads (a new one, or HalfTransforms.lowpassed(scratch=True)'s: a new
    map-sized array each time cost seconds at 480^3 on this virtual machine with huge pages:
    parallel.context.small_pages). The same values either way."""
    raw = np.asarray(compute_raw(), dtype=np.float32)
    if lends and raw.flags.writeable and raw.flags.c_contiguous:
        return normalise_map(raw, out=raw)
    return normalise_map(raw)


def blurred_key(key: str, b_extra: float) -> str:
    """The store key of map `key`'s copy blurred by b_extra (StoredRealSpaceTerm.blurred)."""
    return f"{key}_b{b_extra:g}"


def blurred_copy(key: str, blur_raw, b_extra: float):
    """(key, raw map maker) of map `key`'s copy blurred by b_extra when blur_raw(b) makes the raw
    blurred map: what StoredRealSpaceTerm(..., key, ..., blur_raw).blurred(b_extra) publishes
    (normalised), known before that term is made (so the master can write it ahead)."""
    return blurred_key(key, b_extra), functools.partial(blur_raw, b_extra)


def prefetch_blurred_copy(store: "MapStore", key: str, blur_raw, b_extra: float,
                          lends: bool = False) -> None:
    """The master starts writing map `key`'s copy blurred by b_extra (blurred_copy; MapStore.
    prefetch, not collective; nothing for b_extra <= 0). lends: as StoredRealSpaceTerm's."""
    if b_extra > 0:
        _write_ahead(store, *blurred_copy(key, blur_raw, b_extra), lends)


def _write_ahead(store: "MapStore", key: str, raw, lends: bool = False) -> None:
    """The master starts writing map `key`, raw() normalised, as publish would store it."""
    store.prefetch(key, functools.partial(_normalised, raw, lends=lends))


def _rendezvous(ctx) -> None:
    """Every rank of the world meets here, sleeping between polls instead of spinning."""
    from .distributed import wait_quietly
    wait_quietly(ctx.world, ctx.world.Ibarrier())


class StoredRealSpaceTerm(RealSpaceTerm):
    """engine.RealSpaceTerm over a map of a MapStore (normalised by the master when published).

    Construction and blurred() are collective (MapStore.publish) unless the map was published
    before; target() is collective when the store is parallel (the master evaluates, every rank
    gets f and g by one broadcast); local(atoms) is what a worker evaluates in the distributed
    minimisation and reads only the map around its atoms.

    blur_raw(b), when given, makes the raw map blurred by exp(-b s^2 / 4) (what blurred(b)
    publishes, normalised; the blur commutes with the normalisation), where the caller has a
    cheaper way than transforming the stored map (halfset.HalfTransforms).

    lends: compute_raw and blur_raw give arrays of their own, which the store normalises in
    place (_normalised); by default it normalises into new ones."""

    def __init__(self, store: MapStore, key: str, compute_raw, origin, voxel, atom_weight,
                 blur_raw=None, lends: bool = False):
        self.store = store
        self.key = key
        self.blur_raw = blur_raw
        self.lends = lends
        data = store.publish(key, functools.partial(_normalised, compute_raw, lends=lends))
        super().__init__(data, origin, voxel, atom_weight, normalise=False)
        # b_extra -> std of this map / std of its blurred copy, for blurs whose copy is not
        # published (ScaledBlur); set by the caller that knows the factors
        self.scaled_blurs: dict = {}

    def box_reader(self):
        """A function (lo, hi, need_lo, need_hi) -> (lo', sub-grid from voxel lo' on, whether it
        was read now) from the map's file (MapStore.sub_grid), for the ranks' sub-grids
        (distributed.LocalRealSpaceTerm); None when the map is in memory (one rank)."""
        if not self.store.parallel:
            return None
        return functools.partial(self.store.sub_grid, self.key)

    def _blur(self, b_extra: float):
        """(key, raw map maker, whether the maker lends its arrays) of the copy blurred by
        b_extra (blur_map makes a new array)."""
        if self.blur_raw is not None:
            return (*blurred_copy(self.key, self.blur_raw, b_extra), self.lends)
        return (blurred_key(self.key, b_extra), functools.partial(blur_map, self.data, self.voxel, b_extra),
                True)

    def blurred(self, b_extra: float) -> "RealSpaceTerm":
        if b_extra <= 0:
            return self
        scale = self.scaled_blurs.get(b_extra)
        if scale is not None:
            return ScaledBlur(self, b_extra, scale)
        key, raw, lends = self._blur(b_extra)
        out = StoredRealSpaceTerm(self.store, key, raw, self.origin, self.voxel, self.atom_weight,
                                  lends=lends)
        out.blur_of = (self, b_extra)       # the term it blurs (ncs.term_average)
        return out

    def prefetch_blurred(self, b_extra: float) -> None:
        """The master starts writing the copy blurred(b_extra) will publish (MapStore.prefetch;
        not collective)."""
        if b_extra > 0:
            _write_ahead(self.store, *self._blur(b_extra))

    def target(self, xyz: np.ndarray) -> tuple[float, np.ndarray]:
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)

        def fill(buf, f, g):
            buf[0] = f
            buf[1:] = np.asarray(g, dtype=np.float64).ravel()
        buf = self._from_master(xyz, xyz.size + 1, fill)
        return (float(buf[0]), buf[1:].reshape(xyz.shape)) if buf is not None else super().target(xyz)

    def reduced(self, xyz: np.ndarray, fn) -> float:
        """fn(f, g) of target(xyz), a number (engine.of_target): with a parallel store the master
        evaluates and applies fn and every rank gets the number, not the gradient of every atom
        (24 MB at a million atoms, on every worker, for a number). Only the master reads xyz then
        (a worker may pass what it holds of the model: distributed.BoxedCoordinates)."""
        def fill(buf, f, g):
            buf[0] = fn(f, g)
        buf = self._from_master(xyz, 1, fill)
        return float(buf[0]) if buf is not None else float(fn(*super().target(xyz)))

    def _from_master(self, xyz: np.ndarray, size: int, fill) -> np.ndarray | None:
        """With a parallel store (collective over the world): the master evaluates the target at
        xyz, fill(buf, f, g) puts what the ranks need in a buffer of `size` doubles, and every rank
        gets that buffer by one broadcast. None without one (the caller evaluates itself)."""
        store = self.store
        if not store.parallel:
            return None
        ctx = store.ctx
        buf = np.empty(size)
        if ctx.is_master:
            fill(buf, *super().target(np.ascontiguousarray(xyz, dtype=np.float64)))
        from .distributed import wait_quietly
        wait_quietly(ctx.world, ctx.world.Ibcast(buf, root=0))
        return buf
