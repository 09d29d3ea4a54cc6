"""Half-set validation (DESIGN.md section 4): refinement against each half map, free statistics.

Each half set h refines its own copy of the start model against its own half map (low-passed at
the resolution; the FSC weighting of the full map needs both halves, so it is not used) for a few
candidate data weights. Half set h reads only half map h while it refines. The compare step then
measures, for every half-set model, the FSC of its model map against its own half map (FSC_work)
and against the other half map (FSC_free, data that model never saw). The free residual of a
weight, 1 - mean(FSC_free avg), picks the weight among those whose geometry is within limits.

The chosen weight is the minimum of a parabola in log(weight) through the best tried weight and its
neighbours; the final refinement on the full map runs at FULL_MAP_WEIGHT_FACTOR times it.

The per-residue coordinate error estimate comes from the differences of the two half-set models
(in quadrature over the weights tried). Each half model has an independent error of variance sigma_h^2 per coordinate,
so their difference has variance 2 sigma_h^2: a half model's error is diff / sqrt(2). The full
model is refined against twice the data, halving the noise variance of its target, so its error
is about sigma_h / sqrt(2) = diff / 2. The reported estimate is diff / 2 (ERROR_FACTOR).

Parallel layout (params.halfset_layout "parallel"): the workers of half set h are split into
groups, up to one per weight (weight_layout), so the weights are tried in parallel when there are
enough ranks; the ranks of a group share each minimisation (distributed_minimise); a worker that
plays both halves does half 1 then half 2; with one process the plain engine.minimise runs.
"shared": all the workers form one group that refines every task in turn (half 1, then half 2), so
each worker holds only its boxes' share of a task. The half maps' data terms (low-pass,
normalisation, blur: transforms of the whole box) are prepared once by the master and
memory-mapped by the workers (parallel.mapstore). After refining, the group computes its model's
geometry, and its first rank sends it with the coordinates to the master (buffer Send; the master
posts Irecv and waits quietly), which computes the model's FSC curves against both half maps (the
compare step, compare_task: the workers never transform the whole box), chooses the weight and
writes the report section. With one process the compare step follows each task.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import threading

import numpy as np

from .engine import RealSpaceTerm, geometry_limits, initial_weight, minimise
from .mapstats import atom_density, lowpass
from .simulate import CroppedTransform
from .topology import bond_angle_stats

log = logging.getLogger(__name__)

WEIGHT_FACTORS = (0.25, 0.5, 1.0, 2.0)    # x the initial weight of the full map
# The final refinement's data weight is this factor times the half-set weight of least free
# residual: the full map (mean of the halves) has half the noise variance of one half map, and the
# weight of a least-squares data term scales as 1 / noise variance. Measured on adk (seeds 2-5):
# twice the half-set weight agreed with the weight the geometry limits pick on the full map.
FULL_MAP_WEIGHT_FACTOR = 2.0
BLURS = (40.0, 0.0)                 # A^2 of extra blur in the two macro-cycles
ERROR_FACTOR = 0.5                  # full-model error ~ (difference of the half models) / 2
TAG_HALF = 40                       # + 10 * half + weight index
TAG_STOPPED = 39                    # a group of workers stopped on a signal


def half_term(half_map: np.ndarray, origin, voxel, resolution: float, atom_weight) -> RealSpaceTerm:
    """The data term of one half set: its half map, low-passed at the resolution."""
    data = lowpass(np.asarray(half_map, dtype=np.float32), np.asarray(voxel), resolution)
    return RealSpaceTerm(data, origin, voxel, atom_weight)


def refine_half(xyz0, term: RealSpaceTerm, geom, weight: float, params, minimiser=None,
                blurs=BLURS) -> tuple[np.ndarray, dict]:
    """Macro-cycles of blur 40 -> 0 A^2, params.iterations each, at a fixed weight. Returns the
    refined coordinates and their geometry statistics: the workers' own when they shared the
    minimisation, else the bonds and angles (all the weight choice reads: no clash count, whose
    neighbour list of a million atoms took 13 % of a constrained task's time).

    xyz0: the start, or a function that makes it. A minimiser that chains minimisations on its
    ranks' parts (`chains(geom)` true: _GroupMinimiser over restraints held in boxes) gets the
    function, so that the whole start lives only until its ranks have taken their atoms, and
    returns the coordinates on its first rank only: the others get None."""
    minimiser = minimiser or minimise
    if getattr(minimiser, "chains", lambda g: False)(geom):
        res = minimiser.chain(xyz0 if callable(xyz0) else lambda: xyz0,
                              (term.blurred(b) if b > 0 else term for b in blurs), geom, weight,
                              params.iterations, params)
        return res.xyz, res.statistics
    xyz = np.asarray(xyz0() if callable(xyz0) else xyz0, dtype=np.float64)
    # the start is not held past the first minimisation (the whole model's coordinates, 24 MB at
    # a million atoms, on every worker)
    xyz0 = None
    res = None
    for b in blurs:
        t = term.blurred(b) if b > 0 else term
        res = minimiser(xyz, t, geom, weight, params.iterations, params)
        xyz = res.xyz
    xyz = np.ascontiguousarray(xyz, dtype=np.float64)
    if res is not None and res.statistics is not None:
        return xyz, res.statistics
    return xyz, bond_angle_stats(xyz, geom.r)


HALF_START_STREAM = 0x4A1F5E7   # the half-set starts' random stream (with params.seed, the half)


def half_start(xyz0: np.ndarray, params, half: int, restraints=None, exact=None) -> np.ndarray:
    """The start of half set `half`: the model with its own small random displacements (rms
    params.halfset_start_shake A, seeded by params.seed and the half), so that the two half-set
    models do not share the start's errors and their difference measures coordinate error; then,
    given the restraints and params.fix_chirality, its inverted chiral centres put back.

    exact: the NcsInfo of copies in the model made an exact group (ncs.snap_to_group), which
    the minimisations refine as their master: the master is displaced (and its chiral centres put
    back) and every copy made its image. Copies displaced each on its own would be averaged into
    the master, which would start only rms / sqrt(copies) away (0.04 A for 60 copies): the two
    half sets would share nearly all of the start's errors.

    xyz0 may be a parallel.distributed.BoxedCoordinates (the workers' parts of the start): its
    whole() is made here (collective over its ranks), for this start only."""
    whole_of = getattr(xyz0, "whole", None)
    if whole_of is not None:
        xyz0 = whole_of()
    rms = params.halfset_start_shake
    whole = xyz0
    g = None
    if exact is not None:
        from .ncs import copies_average, master_restraints
        g = exact.groups[0]
        xyz0 = copies_average(g, whole)
        restraints = None if restraints is None else master_restraints(exact, restraints)
    xyz = xyz0
    if rms > 0:
        from .simulate import shake
        # a random stream of its own: an integer seed would be the stream of `hpcrefine shake
        # --seed N`, and a start shaken with the same seed would then be displaced again along
        # its own errors (seed 2: half set 2 started 1.1 A from the truth instead of 0.85)
        xyz = shake(xyz0, rms, seed=[HALF_START_STREAM, params.seed, half])
    if restraints is not None and params.fix_chirality:
        from .parallel.distributed import correct_inversions   # (of a worker's part: collective)
        xyz = correct_inversions(xyz, restraints)[0]
    if g is not None:
        from .ncs import virtual_copies
        out = np.array(whole, dtype=np.float64)
        out[g.copies.ravel()] = virtual_copies(exact, xyz)
        return out
    return xyz


def exact_copies(ncs):
    """The NcsInfo of a constrained run's copies made an exact group in the model (half_start's
    `exact`), else None."""
    from .ncs import ConstrainedMinimiser
    info = ncs.info if isinstance(ncs, ConstrainedMinimiser) else None
    if info is None or info.virtual or not info.closed:
        return None
    return info


def shell_counts(shape_zyx, voxel) -> tuple[np.ndarray, np.ndarray]:
    """(s, number of Fourier coefficients per shell), the shells of simulate.fsc; made once per
    grid (0.3 s for a 480^3 box) and kept."""
    return _shell_counts(tuple(int(n) for n in shape_zyx), tuple(float(v) for v in voxel))


def shell_number(shape_zyx, voxel) -> int:
    """How many shells shell_counts has (without counting them)."""
    from .simulate import _shell_width
    return _shell_width(tuple(int(n) for n in shape_zyx), tuple(float(v) for v in voxel))[1]


@functools.lru_cache(maxsize=4)
def _shell_counts(shape_zyx: tuple, voxel: tuple) -> tuple[np.ndarray, np.ndarray]:
    """The weighted coefficient count of every shell of simulate's shells (the half-complex
    layout's x weights), counting each |k_z|, |k_y| once with the number of coefficients that
    share it: a frequency and its negative have the same square, so the same shell. A quarter of
    the coefficients visited; the counts are whole numbers, equal to those of every coefficient."""
    from .core.density import rfft_freqs
    from .simulate import _shell_centres, _shell_width

    width, n_shells = _shell_width(shape_zyx, voxel)
    fz, fy, fx = (f.ravel() for f in rfft_freqs(shape_zyx, voxel))

    def folded(f):
        n = len(f)
        a = np.abs(f[:n // 2 + 1])
        m = np.full(len(a), 2.0)
        m[0] = 1.0
        if n % 2 == 0:
            m[-1] = 1.0
        return a, m

    az, mz = folded(fz)
    ay, my = folded(fy)
    wx = np.full(len(fx), 2.0)
    wx[0] = 1.0
    if shape_zyx[2] % 2 == 0:
        wx[-1] = 1.0
    wyx = my[:, None] * wx[None, :]
    counts = np.zeros(n_shells)
    for z0 in range(0, len(az), 16):
        z = az[z0:z0 + 16, None, None]
        index = np.rint(np.sqrt(z**2 + ay[None, :, None]**2 + fx[None, None, :]**2) / width).astype(np.int32)
        weight = mz[z0:z0 + 16, None, None] * wyx[None]
        keep = index < n_shells
        counts += np.bincount(index[keep], weights=weight[keep], minlength=n_shells)
    s = _shell_centres(shape_zyx, voxel)
    s.flags.writeable = False
    counts.flags.writeable = False
    return s, counts


def fsc_average(s: np.ndarray, f: np.ndarray, counts: np.ndarray, resolution: float) -> float:
    """FSC averaged over the shells up to 1/resolution, weighted by their number of coefficients."""
    keep = (s <= 1.0 / resolution) & (counts > 0)
    return float(np.sum(f[keep] * counts[keep]) / np.sum(counts[keep]))


class HalfTransforms:
    """The two half maps' Fourier coefficients to the resolution (simulate.CroppedTransform), on
    the rank that does the half sets' map work (the master with a map store; else the one
    process), each transformed once and kept for the half-set stage (133 MB a half at 480^3 and
    3.5 A). Each half map's low-passed map and its blurred copies, and every compare step's FSCs,
    come from them: before, each compare step transformed both half maps again (13 s of the
    master's 21 s per task at a million atoms here), and each blurred copy its low-passed map."""

    def __init__(self, half_maps, resolution: float, coefficients: tuple | None = None):
        """coefficients: both half maps' coefficients in this cube when made already (the crops
        of the full map's FSC weighting, refine.Inputs.half_coefficients; within rounding of
        transform()'s, 2e-7 of the largest); ignored when their shape is not the cube's."""
        grid = half_maps[0]
        self.origin = np.asarray(grid.origin, dtype=np.float64)
        self.voxel = np.asarray(grid.voxel, dtype=np.float64)
        self.resolution = float(resolution)
        self.cube = CroppedTransform.for_resolution(grid.data.shape, self.voxel, resolution)
        self._maps = half_maps
        self._coefficients: dict[int, np.ndarray] = {}
        cube_shape = (len(self.cube.iz), len(self.cube.iy), self.cube.nx)
        if coefficients is not None and all(c.shape == cube_shape for c in coefficients):
            for h, c in zip((1, 2), coefficients):
                c.flags.writeable = False
                self._coefficients[h] = c
        self._density = self._work = self._model = None     # model_coefficients' arrays
        self._scratch: dict = {}                   # thread -> lowpassed(scratch=True)'s arrays
        self._scratch_lock = threading.Lock()

    def share(self, store) -> None:
        """Publish both half maps' coefficients in the map store (collective: the master
        transforms, every rank maps them), so that any rank can make compare steps."""
        for h in (1, 2):
            self._coefficients[h] = store.publish(f"half{h}_coefficients",
                                                  functools.partial(self.coefficients, h), dtype=np.complex64)

    def coefficients(self, h: int) -> np.ndarray:
        """Half map h's coefficients in the cube (read-only; transformed on first use)."""
        if h not in self._coefficients:
            c = self.cube.transform(self._maps[h - 1].data)
            c.flags.writeable = False
            self._coefficients[h] = c
        return self._coefficients[h]

    def lowpassed(self, h: int, b_extra: float = 0.0, scratch: bool = False) -> np.ndarray:
        """Half map h low-passed at the resolution (mapstats.lowpass), blurred by
        exp(-b_extra s^2 / 4) when b_extra > 0: one inverse transform. With scratch, the map is
        made in arrays this object keeps for the calling thread (release_scratch lets go of
        them) and is valid until that thread's next call: the master makes the half maps'
        four maps in two threads, one after another, each written to the map store before the
        next (new arrays for each: the master peaked 0.5-1.0 GB higher at 480^3)."""
        c = self.coefficients(h).copy()
        self.cube.lowpass(c, self.resolution)
        if b_extra > 0:
            self.cube.blur(c, b_extra)
        if not scratch:
            return self.cube.to_map(c)
        with self._scratch_lock:
            arrays = self._scratch.get(threading.get_ident())
            if arrays is None:
                arrays = (np.empty(self.cube.shape, dtype=np.float32),
                          np.empty(self.cube.work_shape(), dtype=np.complex64))
                self._scratch[threading.get_ident()] = arrays
        return self.cube.to_map(c, out=arrays[0], work=arrays[1])

    def blur_scale(self, h: int, b_extra: float) -> float:
        """std(lowpassed(h)) / std(lowpassed(h, b_extra)) without making either map: by
        Parseval, a map's variance is the power of its coefficients other than the mean's
        (which a blur keeps), each x plane of the half-complex layout counted twice but the
        first (and the last when it has no Friedel mate). The factor that takes the map summed
        from half map h's normalised map, blurred, to the sum of its normalised blurred copy
        (ncs.AveragedMap.blurred_from). Plane by plane in z, inside the resolution's sphere
        (what lowpass keeps): no copy of the coefficients."""
        c = self.coefficients(h)
        cube = self.cube
        wx = np.full(cube.nx, 2.0)
        wx[0] = 1.0
        if cube.last_single:
            wx[-1] = 1.0
        gz, gy, gx = (np.exp(-0.5 * b_extra * k * k) for k in (cube.fz, cube.fy, cube.fx))
        yx = cube.fy[:, None] ** 2 + cube.fx[None, :] ** 2
        lim = 1.0 / self.resolution ** 2
        plain = blurred = 0.0
        for k in range(c.shape[0]):
            p = (np.abs(c[k]) ** 2).astype(np.float64)
            p[(yx + cube.fz[k] ** 2) > lim] = 0.0
            if cube.fz[k] == 0:
                p[cube.fy == 0, 0] = 0.0          # the mean
            plain += float((p @ wx).sum())
            blurred += float(gz[k] * (gy @ (p @ (gx * wx))))
        if not (plain > 0 and blurred > 0):
            raise ValueError(f"half map {h} has no power within the resolution; cannot normalise it")
        return math.sqrt(plain / blurred)

    def release_scratch(self) -> None:
        """Let go of the arrays lowpassed(scratch=True) kept (every thread's)."""
        with self._scratch_lock:
            self._scratch.clear()

    def model_coefficients(self, model, xyz, atoms=slice(None)) -> np.ndarray:
        """The low-passed model map's coefficients in the cube (atoms: the model's atom of each
        coordinate), in an array that the next call fills again. The model map, its transform's
        intermediate and the coefficients are arrays kept for every compare step: new ones each
        step cost page faults that took seconds on this virtual machine (with huge pages: see
        parallel.context.small_pages)."""
        shape = self.cube.shape
        if self._density is None:
            self._density = np.empty(shape, dtype=np.float32)
            self._work = np.empty(self.cube.work_shape(), dtype=np.complex64)
            self._model = np.empty(self.cube.out_shape(), dtype=np.complex64)
        c = self.cube.transform(atom_density(xyz, model.element[atoms], model.b[atoms], model.occ[atoms],
                                             shape, self.origin, self.voxel, self.resolution,
                                             out=self._density), out=self._model, work=self._work)
        self.cube.lowpass(c, self.resolution)
        return c


def compare_models(model, models: dict, halves: HalfTransforms, expand=None) -> dict:
    """FSC_work and FSC_free of half-set models: models[h] = xyz refined against half map h.

    Returns {h: {"s", "work", "free", "work_avg", "free_avg"}}. This is the one step that reads
    both half maps for one model: one transform of the model map, low-passed in Fourier space,
    where its FSCs with the half maps' kept coefficients are taken. expand(xyz) -> (coordinates,
    model atom of each): the atoms the map holds when the model is an asymmetric unit whose
    copies the NCS operators make (ncs.ConstrainedMinimiser.expand_model); None: the model's
    atoms."""
    cube = halves.cube
    s, counts = shell_counts(cube.shape, halves.voxel)
    out = {}
    for h, xyz in models.items():
        atoms = slice(None)
        if expand is not None:
            xyz, atoms = expand(xyz)
        calc = halves.model_coefficients(model, xyz, atoms)
        work = cube.fsc(calc, halves.coefficients(h))
        free = cube.fsc(calc, halves.coefficients(3 - h))
        out[h] = {"s": s, "work": work, "free": free,
                  "work_avg": fsc_average(s, work, counts, halves.resolution),
                  "free_avg": fsc_average(s, free, counts, halves.resolution)}
    return out


def weight_layout(size: int, n_weights: int, shared: bool = False) -> dict:
    """(half, weight index) -> world rank that refines that half-set model and sends its results.

    With N >= 3 ranks the workers of a half set are split into min(workers, n_weights) groups;
    weight k goes to group k mod groups, whose first rank (half-set rank = group index) sends.
    With 1 rank everything is local; with 2 ranks, or shared (halfset_layout "shared": every
    task refined by all the workers), worker 1 sends every task."""
    from .parallel.context import half_members

    out = {}
    for h in (1, 2):
        members = [0] if size == 1 else [1] if size == 2 or shared else half_members(size, h)
        groups = min(len(members), n_weights)
        for k in range(n_weights):
            out[(h, k)] = members[k % groups]
    return out


def n_weight_groups(half_size: int, n_weights: int) -> int:
    return max(1, min(half_size, n_weights))


def _pack(work, free, stats: dict, xyz) -> np.ndarray:
    return np.concatenate([work, free, [stats["bond_rmsd"], stats["angle_rmsd"]], xyz.ravel()])


def _unpack(buf: np.ndarray, n_shells: int) -> dict:
    ns = n_shells
    return {"work": buf[:ns], "free": buf[ns:2 * ns], "bond_rmsd": float(buf[2 * ns]),
            "angle_rmsd": float(buf[2 * ns + 1]), "xyz": buf[2 * ns + 2:].reshape(-1, 3)}


def _half_terms(inputs, halves: HalfTransforms | None, atom_weight, scaled: bool = False) -> dict:
    """The data terms of the two half sets with a map store (several ranks), {h: term}: each half
    map's low-passed, normalised map and its blurred copies are made by the master from its
    HalfTransforms (`halves`; None on the workers) and published (collective), so a worker maps
    the files and never transforms a whole box.

    scaled: every task's minimisation reads its map only as the map summed over fixed NCS
    operators (ncs.symmetric_weights): the blurred copies are not made, only the factors of
    their normalisation (HalfTransforms.blur_scale), which the master sends to every rank
    (mapstore.ScaledBlur: each task blurs its summed map instead)."""
    from .parallel.mapstore import prefetch_blurred_copy
    from .refine import fast_term

    # lowpassed(h) is the raw map, lowpassed(h, b) its blurred copy; made in kept arrays when
    # they go to files (a parallel store writes each map before the thread makes its next; a
    # store of one rank keeps the map it is given)
    scratch = inputs.store.parallel
    makers = {h: functools.partial(halves.lowpassed, h, scratch=scratch) if halves else None for h in (1, 2)}
    blurs = [b for b in BLURS if b > 0]
    factors = {}
    if scaled:
        from .ncs import scaled_blur_fits
        blurs_scaled = [b for b in blurs if scaled_blur_fits(b, inputs.map.voxel)]
        factors = _blur_factors(inputs.store.ctx, halves, blurs_scaled)
        blurs = [b for b in blurs if b not in blurs_scaled]
    if halves is not None:
        # the master writes the blurred copies in its map thread while it makes the plain maps
        # (each a transform of the whole box, a normalisation and a write; the workers wait for
        # all four): about half the time at 480^3
        for h in (1, 2):
            for b in blurs:
                prefetch_blurred_copy(inputs.store, f"half{h}", makers[h], b, lends=scratch)
    terms = {}
    for h in (1, 2):
        terms[h] = fast_term(inputs, f"half{h}", makers[h], atom_weight, makers[h], lends=scratch)
        terms[h].scaled_blurs = {b: f for (hf, b), f in factors.items() if hf == h}
        for b in blurs:
            terms[h].blurred(b)          # published now, mapped again by the task
    if halves is not None:
        halves.release_scratch()
    return terms


def _blur_factors(ctx, halves: HalfTransforms | None, blurs) -> dict:
    """{(h, b): HalfTransforms.blur_scale(h, b)} for both halves and these blurs, computed by the
    rank that holds the half maps' transforms (the master: `halves`) and sent to every rank
    (collective over the world when there are several ranks; the others wait sleeping)."""
    keys = [(h, b) for h in (1, 2) for b in blurs]
    buf = np.zeros(len(keys))
    if halves is not None:
        buf[:] = [halves.blur_scale(h, b) for h, b in keys]
    if ctx is not None and ctx.size > 1 and keys:
        from .parallel.distributed import wait_quietly
        wait_quietly(ctx.world, ctx.world.Ibcast(buf, root=0))
    return dict(zip(keys, buf.tolist()))


def compare_task(model, halves: HalfTransforms, h: int, buf: np.ndarray, expand=None) -> np.ndarray:
    """Fill the FSC curves of a packed half-set result (the compare step, on the master when
    there is a map store: it holds the half maps; the workers never transform a whole box)."""
    n_shells = halves.cube.n_shells
    xyz = buf[2 * n_shells + 2:].reshape(-1, 3)
    c = compare_models(model, {h: xyz}, halves, expand)[h]
    buf[:n_shells] = c["work"]
    buf[n_shells:2 * n_shells] = c["free"]
    log.debug("half set %d refined: FSC_work %.4f, FSC_free %.4f", h, c["work_avg"], c["free_avg"])
    return buf


def _half_task(inputs, geom, params, xyz0, h: int, w: float, minimiser, term, halves=None,
               expand=None, exact=None) -> np.ndarray:
    """Refine half set h's model at weight w against half map h alone (term), then (the
    refinement done) its geometry and, given the half maps' transforms (one process), the compare
    step for that model: FSC against its own half map (work) and the other (free). Returns the
    packed result (with a map store, the master fills in the curves: compare_task), or None
    on a rank that shared the minimisation and does not send its result (refine_half)."""
    xyz, st = refine_half(functools.partial(half_start, xyz0, params, h, geom.r, exact), term, geom,
                          w, params, minimiser)
    if xyz is None:
        return None
    n_shells = shell_number(inputs.map.data.shape, inputs.map.voxel)
    buf = _pack(np.full(n_shells, np.nan), np.full(n_shells, np.nan), st, xyz)
    if halves is not None:
        compare_task(inputs.model, halves, h, buf, expand)
    return buf


def run_halfset(ctx, inputs, geom, params, resolution: float, xyz0, atom_weight, outdir: str,
                res_first_atom, done: dict | None = None, on_task=None, interrupts=None,
                ncs=None, prefetch=None) -> dict | None:
    """Collective over ctx.world (ctx may be None: one process). Returns the report section on
    the master (None elsewhere).

    ncs: the run's NCS minimiser (ncs.ConstrainedMinimiser or ncs.RestrainedMinimiser), whose
    for_group(comm, base) gives each task's group the same constraints or restraints as the
    final refinement; None: no NCS.

    Every (half, weight) task is refined by one group of that half set's workers (weight_layout:
    the weights run in parallel when a half set has several workers; with params.halfset_layout
    "shared", by all the workers, task after task), which also computes the
    task's FSC curves and geometry; the group's first rank sends them with the coordinates to the
    master, which only chooses and reports.

    prefetch(final_term), when given, is called by the master as the workers start their tasks,
    with the full map's term (the final stage's data term): it starts writing the maps the
    final stage will publish (MapStore.prefetch), while the master has little else to do.

    Restart and interruption: tasks in `done` ((half, k) -> packed result, from a checkpoint) are
    not run again; the master calls on_task(key, packed) as each task arrives (it checkpoints).
    Before each task a group agrees on interrupts (parallel.interrupt); a group that stops tells
    the master (TAG_STOPPED), which waits for the tasks in flight and raises errors.Interrupted.
    """
    from .errors import Interrupted
    from .ncs import ConstrainedMinimiser, symmetric_weights
    from .refine import fast_term

    done = dict(done or {})
    grid = inputs.map
    # the normalised full map (the final stage's data term, kept when there is a map store;
    # otherwise released as soon as the weight is known)
    final = fast_term(inputs, "final", lambda: inputs.data, atom_weight)
    w_ref = initial_weight(xyz0, final, geom)
    weights = [float(w_ref * f) for f in WEIGHT_FACTORS]
    n_shells = shell_number(grid.data.shape, grid.voxel)
    single = ctx is None or ctx.size == 1
    # under NCS constraints a task refines one copy but its compare step maps every copy: the
    # master would make all eight in turn while the workers wait (38 of its 54 s of this stage at
    # a million atoms), so each task's group makes its own, from the half maps' coefficients
    # that the master publishes in the map store (mapped by every rank)
    constrained = getattr(ncs, "parameters", None)
    workers_compare = constrained is not None and not single and inputs.store is not None
    # the half maps' transforms, on the ranks that make the maps and the compare steps
    halves = (HalfTransforms(inputs.half_maps, resolution, inputs.take_half_coefficients())
              if single or ctx.is_master or workers_compare else None)
    if workers_compare:
        halves.share(inputs.store)
    # the half maps' terms: made here when there is a map store (collective), else by each task
    # under NCS constraints of one exact group the tasks read the half maps only as their sums
    # over the operators: the blurred copies' sums come from the maps' (ScaledBlur)
    scaled = isinstance(ncs, ConstrainedMinimiser) and symmetric_weights(ncs.info, atom_weight, params)
    stored = _half_terms(inputs, halves if single or ctx.is_master else None, atom_weight, scaled) \
        if inputs.store is not None else None

    def term_of(h):
        if stored is not None:
            return stored[h]
        return RealSpaceTerm(halves.lowpassed(h), grid.origin, grid.voxel, np.ones(len(xyz0)))

    if constrained is not None and params.halfset_fixed_operators:
        constrained = (constrained[0], 0)       # the half sets refine no operator

    def finish():
        return summarise(inputs, geom, params, resolution, weights,
                         {key: _unpack(b, n_shells) for key, b in done.items()}, outdir,
                         constrained)

    expand = getattr(ncs, "expand_model", None)
    exact = exact_copies(ncs)

    def with_ncs(comm, base):
        return base if ncs is None else ncs.for_group(comm, base)

    if single:
        for h in (1, 2):
            for k, w in enumerate(weights):
                if (h, k) in done:
                    continue
                if interrupts is not None and interrupts.poll():
                    raise Interrupted
                done[(h, k)] = _half_task(inputs, geom, params, xyz0, h, w, with_ncs(None, minimise),
                                          term_of(h), halves, expand, exact)
                if on_task is not None:
                    on_task((h, k), done[(h, k)])
        return finish()
    from mpi4py import MPI

    from .parallel.distributed import wait_quietly

    shared_layout = params.halfset_layout == "shared"
    layout = weight_layout(ctx.size, len(weights), shared_layout)
    if ctx.is_worker:
        # the communicator whose workers split this rank's tasks, and the halves it plays
        hc = ctx.workers if shared_layout else ctx.half_comm
        my_halves = [1, 2] if shared_layout else ctx.halves_here()
        groups = 1 if shared_layout else n_weight_groups(hc.Get_size(), len(weights))
        group = hc.Split(hc.Get_rank() % groups, hc.Get_rank())
        mine = [k for k in range(len(weights)) if k % groups == hc.Get_rank() % groups]

        minimiser = with_ncs(group, _GroupMinimiser(group, res_first_atom))
        try:
            for h in my_halves:
                for k in mine:
                    if (h, k) in done:
                        continue
                    if interrupts is not None and interrupts.agree(group):
                        if group.Get_rank() == 0:
                            ctx.world.Send([np.zeros(1), MPI.DOUBLE], dest=0, tag=TAG_STOPPED)
                        raise Interrupted
                    buf = _half_task(inputs, geom, params, xyz0, h, weights[k], minimiser, term_of(h),
                                     exact=exact)
                    if group.Get_rank() == 0:
                        if workers_compare:
                            compare_task(inputs.model, halves, h, buf, expand)
                        # the master may be busy with a compare step: wait for it sleeping (a
                        # blocking Send spun a core, 10 % of a worker's time, that the master needed)
                        wait_quietly(ctx.world, ctx.world.Isend([buf, MPI.DOUBLE], dest=0,
                                                                tag=TAG_HALF + 10 * h + k))
                    del buf           # (the whole model's coordinates: not held through the next task)
        finally:
            group.Free()
        return None
    senders = sorted(set(layout.values()))
    log.info("half sets: %s", f"every task refined by all {ctx.n_workers} workers in turn (shared)"
             if shared_layout else f"{len(senders)} group(s) of workers refine the tasks in parallel")

    def fill_curves(key, buf):
        with inputs.store.heavy if inputs.store is not None else contextlib.nullcontext():
            return compare_task(inputs.model, halves, key[0], buf, expand)
    if prefetch is not None:
        prefetch(final)
    _master_gather(ctx, layout, done, 2 * n_shells + 2 + 3 * len(xyz0), on_task, interrupts,
                   None if workers_compare else fill_curves)
    return finish()


class _GroupMinimiser:
    """The minimiser of a task's group of workers (collective over comm): each minimisation
    shared by its ranks (distributed_minimise); over restraints held in boxes, the minimisations
    of a task chained on the ranks' parts (chained_minimise: no whole model on any rank while
    they run, the result on the group's first rank only)."""

    def __init__(self, comm, res_first_atom):
        self.comm = comm
        self.res_first_atom = res_first_atom

    def __call__(self, x, term, geom, weight, iterations, params):
        from .parallel.distributed import distributed_minimise
        return distributed_minimise(self.comm, x, term, geom.r, self.res_first_atom, weight,
                                    iterations, params)[0]

    def chains(self, geom) -> bool:
        from .parallel.decompose import held_in_boxes
        return held_in_boxes(geom.r)

    def chain(self, start, terms, geom, weight, iterations, params):
        from .parallel.distributed import chained_minimise
        return chained_minimise(self.comm, start, terms, geom.r, weight, iterations, params)


def _master_gather(ctx, layout: dict, done: dict, size: int, on_task, interrupts, complete=None) -> None:
    """The master's side of the half-set stage: receive every task not yet done, sleeping
    between polls; stop when each sending rank has either sent all its tasks or stopped.
    complete(key, buf), when given, finishes a received result in place (compare_task)."""
    import time

    from mpi4py import MPI

    from .errors import Interrupted
    from .parallel.distributed import POLL_SECONDS

    pending = {}
    for key, src in layout.items():
        if key not in done:
            buf = np.empty(size)
            h, k = key
            pending[key] = (buf, ctx.world.Irecv([buf, MPI.DOUBLE], source=src, tag=TAG_HALF + 10 * h + k))
    stops = {}
    for src in sorted({src for key, src in layout.items() if key in pending}):
        buf = np.empty(1)
        stops[src] = (buf, ctx.world.Irecv([buf, MPI.DOUBLE], source=src, tag=TAG_STOPPED))
    stopped = set()
    while True:
        for key in list(pending):
            buf, req = pending[key]
            if req.Test():
                del pending[key]
                if complete is not None:
                    complete(key, buf)
                done[key] = buf
                if on_task is not None:
                    on_task(key, buf)
        for src, (_, req) in list(stops.items()):
            if req.Test():
                stopped.add(src)
                del stops[src]
        waiting = {layout[key] for key in pending} - stopped
        if not waiting:
            break
        if interrupts is not None:
            interrupts.poll()
        time.sleep(POLL_SECONDS)
    for _, req in [*stops.values(), *pending.values()]:
        req.Cancel()
        req.Wait()
    if stopped:
        raise Interrupted


def free_minimum(weights, residuals, ok) -> tuple[float, int]:
    """The weight of least free residual among the acceptable ones, refined by a parabola in
    log(weight) through the best tried weight and its two neighbours on the grid (when both are
    acceptable and the parabola opens upwards), kept between those neighbours.
    Returns (weight, index of the best tried weight)."""
    cand = [k for k in range(len(weights)) if ok[k]]
    if not cand:
        return float(weights[0]), 0
    best = min(cand, key=lambda k: residuals[k])
    if 0 < best < len(weights) - 1 and ok[best - 1] and ok[best + 1]:
        x = np.log(np.asarray(weights[best - 1:best + 2], dtype=float))
        y = np.asarray(residuals[best - 1:best + 2], dtype=float)
        a, b, _ = np.polyfit(x, y, 2)
        if a > 0:
            return float(np.exp(np.clip(-b / (2 * a), x[0], x[2]))), best
    return float(weights[best]), best


def expected_free_work_ratio(xyz: np.ndarray, r, shape_zyx, origin, voxel, resolution: float,
                             constrained=None) -> dict:
    """The free/work residual ratio expected for a restrained refinement (Tickle, Laskowski & Moss
    1998): sqrt((f + m_eff) / (f - m_eff)).

    f, the independent observations: the real numbers of the Fourier terms to 1/resolution inside
    the molecular mask (atoms within max(2.5, 0.8 d) A), (4/3) pi V_mask / d^3. m_eff, the effective
    parameters: 3 per atom less one per stiff restraint (bonds, angles, chiral volumes, and n - 3
    per plane of n atoms), at least 5% of 3N. This count of m_eff is an approximation: restraints
    are not infinitely stiff, so it is a lower bound and the ratio it gives a lower bound too.
    constrained: (share, operators) under NCS constraints: the refined atoms are that share of
    the model's (the masters and free atoms), plus that many operator parameters.
    """
    from .mapstats import atom_mask

    mask = atom_mask(xyz, shape_zyx, origin, voxel, max(2.5, 0.8 * resolution))
    v_mask = float(mask.sum()) * float(np.prod(voxel))
    f = 4.0 / 3.0 * np.pi * v_mask / resolution ** 3
    plane_sizes = np.diff(r.plane_start)
    stiff = len(r.bond_idx) + len(r.angle_idx) + len(r.chir_idx) + int(np.maximum(plane_sizes - 3, 0).sum())
    m_eff = max(3 * len(xyz) - stiff, 0.05 * 3 * len(xyz))
    if constrained is not None:
        m_eff = m_eff * constrained[0] + constrained[1]
    ratio = float(np.sqrt((f + m_eff) / (f - m_eff))) if f > m_eff else float("nan")
    return {"observations": round(f, 1), "effective_parameters": round(float(m_eff), 1),
            "ratio": round(ratio, 4)}


def summarise(inputs, geom, params, resolution, weights, results, outdir, constrained=None) -> dict:
    """The choice of weight and the report section (master only): results[(h, k)] holds half set
    h's model at weights[k] with its FSC curves and geometry (computed by the workers)."""
    from .compare import per_residue_error

    model = inputs.model
    grid = inputs.map
    s, counts = shell_counts(inputs.data.shape, grid.voxel)
    trials = []
    for k, w in enumerate(weights):
        r = [results[(h, k)] for h in (1, 2)]
        work = float(np.mean([fsc_average(s, x["work"], counts, resolution) for x in r]))
        free = float(np.mean([fsc_average(s, x["free"], counts, resolution) for x in r]))
        trials.append({"weight": round(w, 4), "fsc_work_avg": round(work, 4),
                       "fsc_free_avg": round(free, 4), "free_residual": round(1 - free, 4),
                       "bond_rmsd": round(float(np.mean([x["bond_rmsd"] for x in r])), 4),
                       "angle_rmsd": round(float(np.mean([x["angle_rmsd"] for x in r])), 3)})
        log.info("half sets, weight %.3f: FSC_work %.4f  FSC_free %.4f  bonds %.4f A  angles %.2f deg",
                 w, work, free, trials[-1]["bond_rmsd"], trials[-1]["angle_rmsd"])
    # the limits as in engine.choose_weight: raised when even the loosest weight is above them
    limits = geometry_limits(params, {g: min(t[g] for t in trials) for g in ("bond_rmsd", "angle_rmsd")})
    ok = [limits.ok(t) for t in trials]
    if not any(ok):
        log.warning("no half-set weight met the geometry limits; using the lowest, %.3f", weights[0])
    w_free, best = free_minimum(weights, [t["free_residual"] for t in trials], ok)
    curves = {h: results[(h, best)] for h in (1, 2)}
    models = {h: np.array([results[(h, k)]["xyz"] for k in range(len(weights))]) for h in (1, 2)}
    keep = s <= 1.0 / resolution
    work_curve = (curves[1]["work"] + curves[2]["work"]) / 2
    free_curve = (curves[1]["free"] + curves[2]["free"]) / 2
    t = trials[best]
    ratio = (1 - t["fsc_free_avg"]) / max(1 - t["fsc_work_avg"], 1e-9)
    expected = expected_free_work_ratio(models[1][best], geom.r, inputs.data.shape, grid.origin,
                                        grid.voxel, resolution, constrained)
    # every weight tried gives one pair of independent half-set models: their differences,
    # averaged in quadrature, estimate the error with less noise than one pair (Spearman against
    # the real per-residue error on adk: 0.32 with the chosen weight's pair, 0.38 with all)
    diff = np.sqrt(np.mean([per_residue_error(models[1][k], models[2][k], model.res_index,
                                              model.n_residues) ** 2 for k in range(len(weights))], axis=0))
    err = ERROR_FACTOR * diff
    w_final = FULL_MAP_WEIGHT_FACTOR * w_free
    log.info("half sets: least free residual at weight %.3f (tried: %.3f, free residual %.4f, "
             "FSC_work %.4f, FSC_free %.4f); final weight on the full map %.3f; free/work ratio "
             "observed %.3f, expected %.3f (f %.0f, m_eff %.0f), mean per-residue error estimate "
             "%.3f A", w_free, weights[best], t["free_residual"], t["fsc_work_avg"],
             t["fsc_free_avg"], w_final, ratio, expected["ratio"], expected["observations"],
             expected["effective_parameters"], float(np.mean(err)))
    section = {
        "weights_tried": trials, "chosen_weight": round(w_free, 4),
        "nearest_weight_tried": weights[best], "final_weight": round(w_final, 4),
        "fsc": {"s": np.round(s[keep], 5).tolist(), "work": np.round(work_curve[keep], 4).tolist(),
                "free": np.round(free_curve[keep], 4).tolist()},
        "free_work_ratio_observed": round(float(ratio), 4),
        "free_work_ratio_expected": expected,
        "per_residue_error": {"chain": [str(c) for c in model.res_chain],
                              "seqid": [int(x) if str(x).lstrip("-").isdigit() else str(x)
                                        for x in model.res_seqid],
                              "error": np.round(err, 4).tolist(),
                              "factor": "error = RMS over the weights tried of the difference of the two half-set models / 2"},
    }
    try:
        plot_fsc(os.path.join(outdir, "fsc_halfset.png"), s[keep], work_curve[keep],
                 free_curve[keep], resolution)
    except ImportError:                           # pragma: no cover
        log.warning("matplotlib not available: no fsc_halfset.png")
    return section


def plot_fsc(path, s, work, free, resolution):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s, work, label="FSC_work (own half map)")
    ax.plot(s, free, label="FSC_free (other half map)")
    ax.axvline(1.0 / resolution, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("s (1/A)")
    ax.set_ylabel("FSC model-map")
    ax.set_ylim(min(0.0, float(np.min(free)) - 0.05), 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
