"""The run file: one HDF5 file per refinement (OUTPUT/checkpoint.h5) holding what was run, the
trajectory, and the state a restart continues from. Only the master writes it.

Layout (read it with plain h5py; every attribute is a number or a JSON string):
  /                 attrs: format, program, version, command, created, updated, status
                    ("running", "interrupted", "done"), stage, restarts, elapsed_seconds
  /inputs           attrs: model, model_sha256, maps (JSON: path -> sha256), monlib
  /params           attr json: the resolved parameters
  /layout           attrs: ranks, workers, half_set_workers (JSON), halfset_layout and
                    whole_model_on_workers (as the run chose them: parallel.budget);
                    dataset block_bounds (atom blocks of the workers sharing the final refinement)
  /trajectory/xyz   (frames, atoms, 3) float32, chunked one frame per chunk, uncompressed
                    (gzip in files of earlier versions)
  /trajectory/b     (frames, atoms) float32, gzip
  /trajectory/info  JSON string per frame: stage, cycle, step, weight, target, iterations,
                    seconds, and FSC averages for half-set frames
  /state            the restart state: attrs stage, cycle (next macro-cycle), weight, w_half,
                    cycles (JSON), halfset (JSON report section), seed, protocol (JSON: the
                    finished protocol steps of the "prepare" stage); datasets prepared (the start
                    model after those steps), occ (the occupancies an occupancy step refined, in
                    the final checkpoint), xyz (coordinates
                    at the start of the current macro-cycle, float64), tasks/<h>_<k> (half-set
                    results, float64), calls/<i> (the current macro-cycle's completed
                    minimisations: float64 coordinates, attrs f, iterations, evaluations, seconds
                    and, when the minimiser made them, statistics (float64, engine.STATISTICS_KEYS)),
                    fftw_wisdom (bytes, when pyfftw has any)

Atomic by construction: every checkpoint writes a complete new file next to the old one
(NAME.part, with the unchanged trajectory copied chunk by chunk), flushes it to disk and renames
it over the old one. A kill at any instant, SIGKILL during the write included, leaves the last
complete checkpoint in place; a stale NAME.part is removed at the next start.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field

import numpy as np

from . import __version__
from .errors import InputError

FORMAT = 1
NAME = "checkpoint.h5"
INTERRUPTED_EXIT = 75                  # EX_TEMPFAIL: interrupted, checkpoint written, resume
# parameters that may differ in a restart (they do not change the result: a continued run keeps
# the half-set layout chosen at the start, /layout)
RESTART_FREE_PARAMS = ("checkpoint_seconds", "checkpoint_steps", "worker_memory_gb")


def file_sha256(path: str, block: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(block)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


_XYZ_FILTERS = dict(compression=None, shuffle=False)    # the trajectory's coordinates: none


@dataclass
class CallRecord:
    """One completed minimisation of the current macro-cycle, as the driver saw it."""
    xyz: np.ndarray
    f: float
    iterations: int
    evaluations: int
    seconds: float
    # the geometry statistics the minimiser returned (MinimiseResult.statistics), so that a
    # replayed weight trial is judged on the same numbers, bit for bit, as the original one
    statistics: dict | None = None


@dataclass
class RunState:
    """Where a refinement is: everything a restart needs besides the inputs."""
    stage: str = "halfset"                       # ("prepare"), "halfset", "final", "done"
    tasks: dict = field(default_factory=dict)    # (half, weight index) -> packed float64 result
    halfset: dict | None = None                  # the report section, once the half sets are done
    w_half: float | None = None
    cycle: int = 1                               # the macro-cycle in progress (1-based)
    xyz: np.ndarray | None = None                # coordinates at the start of that cycle
    weight: float | None = None                  # the previous cycle's weight
    cycles: list = field(default_factory=list)   # report records of the completed cycles
    calls: list = field(default_factory=list)    # CallRecord of the cycle in progress
    frames: list = field(default_factory=list)   # new trajectory frames: (xyz, info)
    n_frames: int = 0                            # frames already in the file
    elapsed: float = 0.0                         # wall seconds of earlier runs
    restarts: int = 0
    steps: int = 0                               # completed steps (tasks and minimisations)
    protocol: list = field(default_factory=list)  # report records of the finished protocol steps
    b: np.ndarray | None = None                  # B after an ADP step (not stored: ADP ends a run)
    occ: np.ndarray | None = None                # occupancies after an occupancy step (/state/occ)
    prepared: np.ndarray | None = None           # the start after the "prepare" stage's steps


@dataclass
class RunIdentity:
    """What a checkpoint must match to be continued."""
    model: str
    model_sha256: str
    maps: dict
    params: dict
    ranks: int
    command: str
    monlib: str = ""

    @classmethod
    def of(cls, model: str, maps: list[str], params: dict, ranks: int, command: str, monlib: str,
           hashes: dict | None = None):
        """hashes: file_sha256 of some of the files already (hash_ahead), by path."""
        def sha(path):
            return (hashes or {}).get(path) or file_sha256(path)
        return cls(os.path.abspath(model), sha(model), {os.path.abspath(p): sha(p) for p in maps},
                   params, ranks, command, monlib)


def hash_ahead(paths: list[str | None]):
    """Start file_sha256 of the files that exist among paths in a thread of their own; returns a
    function that waits for the thread and gives {path: sha256} (without the files it could not
    read: RunIdentity.of hashes those itself, or the input checks have refused them first)."""
    import threading

    done: dict = {}

    def run():
        for p in dict.fromkeys(q for q in paths if q):
            try:
                done[p] = file_sha256(p)
            except OSError:          # left to RunIdentity.of, or to the input checks
                continue
    thread = threading.Thread(target=run, name="hash-inputs", daemon=True)
    thread.start()

    def result() -> dict:
        thread.join()
        return done
    return result


def check_compatible(path: str, ident: RunIdentity, force: bool) -> None:
    """Refuse a checkpoint from other inputs, other parameters or another format (InputError);
    with force, a different program version and different parameters are accepted (the inputs
    never: the state would not belong to them)."""
    meta = read_meta(path)
    if meta["format"] != FORMAT:
        raise InputError(f"checkpoint {path} has format {meta['format']}, this hpcrefine reads "
                         f"format {FORMAT}: start a new run")
    if meta["model_sha256"] != ident.model_sha256:
        raise InputError(f"checkpoint {path} was made from another model ({meta['model']}); "
                         "restart with the same inputs or start a new run")
    old_maps = sorted(meta["maps"].values())
    if old_maps != sorted(ident.maps.values()):
        raise InputError(f"checkpoint {path} was made from other maps ({', '.join(meta['maps'])}); "
                         "restart with the same inputs or start a new run")
    if meta["state_stage"] == "done":
        raise InputError(f"checkpoint {path} is of a finished run: nothing to continue")
    problems = []
    if meta["version"] != __version__:
        problems.append(f"it was written by hpcrefine {meta['version']}, this is {__version__}")
    old = {k: v for k, v in meta["params"].items() if k not in RESTART_FREE_PARAMS}
    new = {k: v for k, v in ident.params.items() if k not in RESTART_FREE_PARAMS}
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if diff:
        problems.append("parameters differ: " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}"
                                                          for k in diff))
    if problems and not force:
        raise InputError(f"checkpoint {path} does not match this run: {'; '.join(problems)}. "
                         "Pass --force to continue anyway")


def _layout_choice(attrs) -> dict | None:
    """The half-set layout a checkpoint's run chose (None in files written before it was kept)."""
    if "halfset_layout" not in attrs:
        return None
    return {"halfset_layout": str(attrs["halfset_layout"]),
            "whole_model_on_workers": bool(attrs["whole_model_on_workers"])}


def read_meta(path: str) -> dict:
    """The identity and position of a checkpoint; InputError when it is not a readable one."""
    import h5py

    if not os.path.exists(path):
        raise InputError(f"checkpoint file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("program") != "hpcrefine":
                raise InputError(f"{path} is not an hpcrefine checkpoint")
            inp = f["inputs"].attrs
            st = f["state"].attrs
            return {"format": int(f.attrs["format"]), "version": str(f.attrs["version"]),
                    "status": str(f.attrs["status"]), "command": str(f.attrs["command"]),
                    "model": str(inp["model"]), "model_sha256": str(inp["model_sha256"]),
                    "maps": json.loads(inp["maps"]), "params": json.loads(f["params"].attrs["json"]),
                    "ranks": int(f["layout"].attrs["ranks"]), "state_stage": str(st["stage"]),
                    "cycle": int(st["cycle"]), "elapsed": float(f.attrs["elapsed_seconds"]),
                    "restarts": int(f.attrs["restarts"]), "steps": int(st["steps"]),
                    "updated": str(f.attrs["updated"]), "frames": int(f["trajectory/xyz"].shape[0]),
                    "layout_choice": _layout_choice(f["layout"].attrs)}
    except InputError:
        raise
    except (OSError, KeyError, ValueError) as exc:
        raise InputError(f"checkpoint {path} is damaged or incomplete ({exc}); use an earlier "
                         "copy or start a new run") from None


def load_state(path: str, n_atoms: int) -> RunState:
    """The restart state of a checkpoint (after check_compatible)."""
    import h5py

    with h5py.File(path, "r") as f:
        g = f["state"]
        a = g.attrs
        st = RunState(stage=str(a["stage"]), cycle=int(a["cycle"]),
                      weight=_none(a["weight"]), w_half=_none(a["w_half"]),
                      cycles=json.loads(a["cycles"]), halfset=json.loads(a["halfset"]),
                      elapsed=float(f.attrs["elapsed_seconds"]), restarts=int(f.attrs["restarts"]) + 1,
                      steps=int(a["steps"]), n_frames=int(f["trajectory/xyz"].shape[0]),
                      protocol=json.loads(a["protocol"]) if "protocol" in a else [])
        if "xyz" in g:
            st.xyz = g["xyz"][()]
        if "prepared" in g:
            st.prepared = g["prepared"][()]
        if "occ" in g:
            st.occ = g["occ"][()]
        for key, ds in g["tasks"].items():
            h, k = (int(x) for x in key.split("_"))
            st.tasks[(h, k)] = ds[()]
        for i in range(len(g["calls"])):
            ds = g["calls"][str(i)]
            stats = ds.attrs.get("statistics")
            if stats is not None:
                from .engine import statistics_from_array
                stats = statistics_from_array(np.asarray(stats, dtype=np.float64))
            st.calls.append(CallRecord(ds[()], float(ds.attrs["f"]), int(ds.attrs["iterations"]),
                                       int(ds.attrs["evaluations"]), float(ds.attrs["seconds"]), stats))
        if "fftw_wisdom" in g:
            _import_wisdom(g["fftw_wisdom"][()])
    if st.xyz is not None and st.xyz.shape != (n_atoms, 3):
        raise InputError(f"checkpoint {path} holds {len(st.xyz)} atoms, the model has {n_atoms}")
    return st


def _none(v):
    v = float(v)
    return None if np.isnan(v) else v


def _export_wisdom():
    try:
        import pyfftw
    except ImportError:                                     # pragma: no cover
        return None
    w = pyfftw.export_wisdom()
    return np.frombuffer(b"\0".join(w), dtype=np.uint8) if any(w) else None


def _import_wisdom(arr) -> None:
    try:
        import pyfftw
    except ImportError:                                     # pragma: no cover
        return
    parts = bytes(np.asarray(arr, dtype=np.uint8)).split(b"\0")
    if len(parts) == 3:
        pyfftw.import_wisdom(tuple(parts))


def _snapshot(state: RunState) -> RunState:
    """A copy of state that later steps do not change: its own lists and records, the new
    frames' coordinates as written (float32); the arrays it shares are replaced, never
    changed in place, by the driver."""
    import copy

    snap = copy.copy(state)
    snap.frames = [(np.array(x, dtype=np.float32), dict(meta)) for x, meta in state.frames]
    snap.tasks = dict(state.tasks)
    snap.calls = list(state.calls)
    snap.cycles = copy.deepcopy(state.cycles)
    snap.halfset = copy.deepcopy(state.halfset)
    snap.protocol = copy.deepcopy(state.protocol)
    return snap


class CheckpointWriter:
    """The master's writer of OUTPUT/checkpoint.h5: write(state) replaces the file atomically."""

    def __init__(self, path: str, ident: RunIdentity, layout: dict, b_factors: np.ndarray,
                 seed: int, t_start: float, source: str | None = None):
        self.path = path
        self.source = source            # the checkpoint continued from (its trajectory is copied)
        self.ident = ident
        self.layout = layout
        self.b = np.asarray(b_factors, dtype=np.float32)
        self.seed = seed
        self.t_start = t_start
        self.created = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.last_write = time.monotonic()
        self.n_writes = 0
        self.seconds = 0.0
        self.bytes = 0
        self._pending = None            # (future, snapshot, state) of a write in flight
        part = path + ".part"
        if os.path.exists(part):
            os.remove(part)                     # left by a run killed while writing

    def elapsed(self, state: RunState) -> float:
        return state.elapsed + time.perf_counter() - self.t_start

    def write(self, state: RunState, status: str = "running", wait: bool = True) -> None:
        """Replace the file with one holding state (status: "running", "interrupted", "done").
        With wait False the file is written by a thread of its own from a copy of state taken
        now, and this returns at once: h5py lets go of the GIL while it compresses and writes,
        so the run goes on (the ranks waited 2-3 s for the master's write at the end of the
        half-set stage at a million atoms). Every write, and finish(), first waits for the one
        in flight; a failed write raises there. The file is replaced only once complete."""
        self.finish()
        snap = _snapshot(state)
        elapsed = self.elapsed(state)
        if wait:
            self._write(snap, status, elapsed)
            self._written(state, snap)
            return
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint")
        self._pending = (pool.submit(self._write, snap, status, elapsed), snap, state)
        pool.shutdown(wait=False)               # the thread ends with its one write

    def finish(self) -> None:
        """Wait for the write in flight (write(wait=False)), if any; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            future, snap, state = pending
            future.result()
            self._written(state, snap)

    def _written(self, state: RunState, snap: RunState) -> None:
        """The bookkeeping of a completed write of snap, a copy of state: its frames are in the
        file (frames added since stay to be written)."""
        state.n_frames += len(snap.frames)
        del state.frames[:len(snap.frames)]

    def _write(self, state: RunState, status: str, elapsed: float) -> None:
        import h5py

        t0 = time.perf_counter()
        part = self.path + ".part"
        old = self.source or self.path
        old = old if state.n_frames and os.path.exists(old) else None
        with h5py.File(part, "w", libver="latest") as f:
            f.attrs.update({"format": FORMAT, "program": "hpcrefine", "version": __version__,
                            "command": self.ident.command, "created": self.created,
                            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "status": status,
                            "stage": state.stage, "restarts": state.restarts,
                            "elapsed_seconds": elapsed})
            g = f.create_group("inputs")
            g.attrs.update({"model": self.ident.model, "model_sha256": self.ident.model_sha256,
                            "maps": json.dumps(self.ident.maps), "monlib": self.ident.monlib})
            f.create_group("params").attrs["json"] = json.dumps(self.ident.params)
            g = f.create_group("layout")
            g.attrs.update({"ranks": self.ident.ranks, "workers": self.layout.get("workers", 1),
                            "half_set_workers": json.dumps(self.layout.get("half_set_workers", []))})
            if "halfset_layout" in self.layout:
                g.attrs.update({"halfset_layout": self.layout["halfset_layout"],
                                "whole_model_on_workers": int(self.layout["whole_model_on_workers"])})
            g.create_dataset("block_bounds", data=np.asarray(self.layout.get("block_bounds", []),
                                                             dtype=np.int64))
            self._trajectory(f, old, state)
            self._state(f, state)
            f.flush()
        fd = os.open(part, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(part, self.path)
        self.source = None
        self.last_write = time.monotonic()
        self.n_writes += 1
        self.seconds += time.perf_counter() - t0
        self.bytes = os.path.getsize(self.path)

    def _trajectory(self, f, old: str | None, state: RunState) -> None:
        import h5py

        n = len(self.b)
        t = f.create_group("trajectory")
        total = state.n_frames + len(state.frames)
        # coordinates uncompressed: gzip took 1.8 s of a thread's CPU for 11 frames of a million
        # atoms, to make them 0.65 of their size in a file whose restart state (float64) is
        # larger; the B-factors, mostly constant, shrink tenfold. A file written before keeps
        # its coordinates' filters (its chunks are copied as they are)
        with (h5py.File(old, "r") if old is not None and state.n_frames else contextlib.nullcontext()) as src:
            sx = None if src is None else src["trajectory/xyz"]
            packed = _XYZ_FILTERS if sx is None else dict(compression=sx.compression,
                                                          compression_opts=sx.compression_opts,
                                                          shuffle=sx.shuffle)
            xyz = t.create_dataset("xyz", shape=(total, n, 3), maxshape=(None, n, 3), dtype=np.float32,
                                   chunks=(1, n, 3), **packed)
            b = t.create_dataset("b", shape=(total, n), maxshape=(None, n), dtype=np.float32,
                                 chunks=(1, n), compression="gzip", compression_opts=1, shuffle=True)
            info = t.create_dataset("info", shape=(total,), maxshape=(None,), dtype=h5py.string_dtype())
            if src is not None:
                sb, si = src["trajectory/b"], src["trajectory/info"]
                for i in range(state.n_frames):
                    # chunks are copied as they are, compressed or not, without decoding
                    _, raw = sx.id.read_direct_chunk((i, 0, 0))
                    xyz.id.write_direct_chunk((i, 0, 0), raw)
                    _, raw = sb.id.read_direct_chunk((i, 0))
                    b.id.write_direct_chunk((i, 0), raw)
                info[:state.n_frames] = si[:state.n_frames]
        for j, (x, meta) in enumerate(state.frames):
            i = state.n_frames + j
            xyz[i] = np.asarray(x, dtype=np.float32)
            b[i] = self.b
            info[i] = json.dumps(meta)

    def _state(self, f, state: RunState) -> None:
        g = f.create_group("state")
        g.attrs.update({"stage": state.stage, "cycle": state.cycle,
                        "weight": np.nan if state.weight is None else state.weight,
                        "w_half": np.nan if state.w_half is None else state.w_half,
                        "cycles": json.dumps(state.cycles), "halfset": json.dumps(state.halfset),
                        "seed": self.seed, "steps": state.steps,
                        "protocol": json.dumps(state.protocol)})
        if state.xyz is not None:
            g.create_dataset("xyz", data=np.asarray(state.xyz, dtype=np.float64))
        if state.prepared is not None:
            g.create_dataset("prepared", data=np.asarray(state.prepared, dtype=np.float64))
        if state.occ is not None:
            g.create_dataset("occ", data=np.asarray(state.occ, dtype=np.float64))
        tasks = g.create_group("tasks")
        for (h, k), arr in sorted(state.tasks.items()):
            tasks.create_dataset(f"{h}_{k}", data=np.asarray(arr, dtype=np.float64))
        calls = g.create_group("calls")
        for i, c in enumerate(state.calls):
            ds = calls.create_dataset(str(i), data=np.asarray(c.xyz, dtype=np.float64))
            ds.attrs.update({"f": c.f, "iterations": c.iterations, "evaluations": c.evaluations,
                             "seconds": c.seconds})
            if c.statistics is not None:
                from .engine import statistics_to_array
                ds.attrs["statistics"] = statistics_to_array(c.statistics)
        w = _export_wisdom()
        if w is not None:
            g.create_dataset("fftw_wisdom", data=w)


def status_lines(path: str) -> list[str]:
    """`hpcrefine status RUN.h5`: where a run is."""
    import h5py

    meta = read_meta(path)
    lines = [f"{path}: {meta['status']}, stage {meta['state_stage']}"
             + (f", macro-cycle {meta['cycle']}" if meta["state_stage"] == "final" else "")
             + f", {meta['steps']} steps done, {meta['frames']} trajectory frames",
             f"  elapsed {meta['elapsed']:.1f} s over {meta['restarts'] + 1} run(s), last written "
             f"{meta['updated']}, hpcrefine {meta['version']}, {meta['ranks']} ranks",
             f"  model {meta['model']}"]
    with h5py.File(path, "r") as f:
        infos = f["trajectory/info"]
        if len(infos):
            last = json.loads(infos[-1])
            lines.append("  last step: " + ", ".join(f"{k} {v}" for k, v in last.items()))
        hs = json.loads(f["state"].attrs["halfset"])
        if hs:
            t = min(hs["weights_tried"], key=lambda t: abs(t["weight"] - hs["nearest_weight_tried"]))
            lines.append(f"  half sets: FSC_work {t['fsc_work_avg']:.4f}, FSC_free {t['fsc_free_avg']:.4f}, "
                         f"final weight {hs['final_weight']:.3f}")
    return lines
