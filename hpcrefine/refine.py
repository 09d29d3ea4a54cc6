"""The `refine` and `idealize` drivers: check every input, then refine, then write outputs."""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import __version__
from .engine import (GeometryTerm, RealSpaceTerm, choose_weight, continue_trial, geometry_of,
                     initial_weight, minimise)
from .errors import InputError
from .log import Timer, run_header, setup_logging
from .mapio import MapGrid, check_model_inside, check_same_grid, read_map
from .core.density import normalise_map
from .core.modelmap import DensityFitTerm
from .mapstats import atom_mask, cc_mask, fsc_weighted
from .modelio import Model, atomic_write_text, read_model, updated_structure, write_model
from .parallel.budget import LayoutChoice, choose_layout
from .parallel.context import MMAP_THRESHOLD, MMAP_THRESHOLD_ENV, fixed_mmap_threshold, make_context
from .parallel.decompose import PartRestraints, held_in_boxes
from .parallel.distributed import install_abort_on_error
from .parallel.runner import RankMinimiser
from .params import RefineParams
from .restraints import Restraints
from .topology import library_restraints

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("refined.cif", "refined.pdb", "report.json", "refine.log", "idealized.cif",
                "idealized.pdb", "fsc_halfset.png", "checkpoint.h5")


@dataclass
class Inputs:
    model: Model
    restraints: Restraints
    map: MapGrid | None
    data: np.ndarray | None          # map used for the data term (full, or mean of half maps)
    half_maps: tuple | None
    monlib_dir: str
    # with several ranks, the maps every rank reads, prepared by the master and memory-mapped
    # (parallel.mapstore; None with one rank)
    store: object | None = None
    # the restraints before the low-resolution terms, and the reference model: to retarget the
    # rotamer restraints after a rotamer step (retarget_lowres)
    covalent: Restraints | None = None
    reference: Model | None = None
    # the half maps' FSC (s, curve), on the rank that weighted the full map by it (validation
    # reports it again)
    half_map_fsc: tuple | None = None
    # the half maps' coefficients in the resolution's cube (simulate.CroppedTransform), cropped
    # from the transforms of the FSC weighting on the rank that made it, for the half-set stage
    # (halfset.HalfTransforms takes them: two fewer transforms of the box); None once taken
    half_coefficients: tuple | None = None
    # the rfftn of `data` when the FSC weighting made it (mapstats.fsc_weighted) and the ranks
    # share a map store, for the validations on the workers: two transforms of the box fewer at
    # the end of a run (take_map_coefficients)
    map_coefficients: np.ndarray | None = None
    # the master alone built the restraints and the workers have none yet (the same on every
    # rank): run_refine gives each its part or the whole set (_restraints_on_master)
    held_back: bool = False
    # the parameters with the half-set layout chosen (parallel.budget.choose_layout), and the
    # choice: what the run uses from here on (None without parameters)
    params: RefineParams | None = None
    layout: LayoutChoice | None = None

    def take_half_coefficients(self) -> tuple | None:
        kept, self.half_coefficients = self.half_coefficients, None
        return kept

    def take_map_coefficients(self) -> np.ndarray | None:
        kept, self.map_coefficients = self.map_coefficients, None
        return kept


def fast_term(inputs: Inputs, key: str, compute_raw, atom_weight, blur_raw=None,
              lends: bool = False) -> RealSpaceTerm:
    """The fast real-space target over the map compute_raw() returns (normalised): with a map
    store, computed once by the master and memory-mapped by every rank under `key` (collective
    unless published before), its blurred copies made by blur_raw(b) when given
    (StoredRealSpaceTerm, and its `lends`); else in this process."""
    grid = inputs.map
    if inputs.store is not None:
        from .parallel.mapstore import StoredRealSpaceTerm
        return StoredRealSpaceTerm(inputs.store, key, compute_raw, grid.origin, grid.voxel, atom_weight,
                                   blur_raw, lends)
    return RealSpaceTerm(compute_raw(), grid.origin, grid.voxel, atom_weight)


def _weighting(full, half1, half2, voxel, params, keep_transform: bool = False):
    """(the full map weighted by the half maps' FSC, the half-map FSC (s, curve), the half maps'
    coefficients in the resolution's cube or [], the weighted map's rfftn when keep_transform
    else None): mapstats.fsc_weighted, the coefficients cropped from its transforms
    (Inputs.half_coefficients, Inputs.map_coefficients)."""
    from .simulate import CroppedTransform

    h1 = np.asarray(half1, dtype=np.float32)
    h2 = np.asarray(half2, dtype=np.float32)
    cube = (CroppedTransform.for_resolution(h1.shape, voxel, params.resolution)
            if params is not None and params.resolution > 0 else None)
    kept = []
    transform = []
    # the full map (None: the mean of the halves); shells that hold mostly noise are damped by
    # the half-map FSC (Rosenthal & Henderson)
    data, weighting = fsc_weighted(
        None if full is None else np.asarray(full, dtype=np.float32), h1, h2, voxel,
        seen=None if cube is None else lambda f1, f2: kept.extend((cube.crop(f1), cube.crop(f2))),
        weighted=transform.append if keep_transform else None)
    return (data, (np.asarray(weighting["s"]), np.asarray(weighting["fsc_half"])), kept,
            transform[0] if transform else None)


def check_output_dir(outdir: str, overwrite: bool) -> None:
    """Refuse to overwrite earlier results unless asked (checked before any work starts)."""
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise InputError(f"output path {outdir} exists and is not a directory")
    if os.path.isdir(outdir) and not overwrite:
        present = [n for n in OUTPUT_NAMES if os.path.exists(os.path.join(outdir, n))]
        if present:
            raise InputError(f"output directory {outdir} already holds results ({', '.join(present)}); "
                             "choose another --output or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(outdir))
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot create output directory {outdir}: {parent} is not writable")


def check_rank_count(ctx, model: Model) -> None:
    """The workers share a model by blocks of whole residues: more workers than residues (in all,
    or in one half set) leaves some without work. Stop before anything starts."""
    largest_group = max(ctx.n_workers, 1)
    if largest_group > model.n_residues:
        raise InputError(f"{ctx.size} ranks give {ctx.n_workers} workers for a model of only "
                         f"{model.n_residues} residues: each worker needs at least one residue; "
                         f"run with at most {model.n_residues + 1} ranks")


def load_inputs(model_path: str, map_path: str | None, half_maps, monlib: str | None,
                ligands: list[str], need_map: bool, params: RefineParams | None = None,
                comm=None, share_map: bool = True, stored_layout: dict | None = None) -> Inputs:
    """Read and check every input; raises InputError before anything is written. With params,
    the low-resolution restraints they ask for are added (hpcrefine.lowres). With a
    communicator of several ranks (collective over it), the FSC-weighted map of half maps is
    computed by its rank 0 alone and broadcast: its FFTs need several map-sized temporaries,
    which the other ranks then never hold (the workers wait without spinning). With
    share_map=False it is not broadcast: the other ranks get data None (the run publishes the map
    in its MapStore once the inputs are checked). With params, the half-set layout is chosen
    once the model and the map are known (choose_layout; stored_layout: a checkpoint's choice),
    and Inputs.params holds the parameters with it."""
    # (the workers read the gemmi Structure only to search for NCS: 0.12 GB at a million atoms)
    model = read_model(model_path, comm, structure_everywhere=params is None or params.ncs != "off")
    grid = None
    data = None
    halves = None
    half_fsc = None
    kept = []                # the half maps' cropped coefficients (Inputs.half_coefficients)
    map_coefficients = None
    if need_map and not map_path and not half_maps:
        raise InputError("a map is needed: give --map MAP and/or --half-maps H1 H2")
    if half_maps:
        h1, h2 = read_map(half_maps[0]), read_map(half_maps[1])
        check_same_grid(h1, h2)
        halves = (h1, h2)
    if map_path:
        grid = read_map(map_path)
        if halves:
            check_same_grid(grid, halves[0])
    elif halves:
        grid = halves[0]
    if grid is not None:
        check_model_inside(model.xyz, grid)
        if map_path:
            data = np.asarray(grid.data, dtype=np.float32)
        shared = comm is not None and comm.Get_size() > 1
        if halves and shared and comm.Get_rank() > 0:
            data = np.empty(halves[0].data.shape, dtype=np.float32) if share_map else None
        elif halves:
            data, half_fsc, kept, map_coefficients = _weighting(data, halves[0].data, halves[1].data,
                                                                grid.voxel, params, keep_transform=shared)
        if halves and shared and share_map:
            from .parallel.distributed import wait_quietly
            wait_quietly(comm, comm.Ibcast(data, root=0))
    layout = None
    if params is not None:
        params, layout = _choose_layout(params, model.n_atoms, grid, comm, stored_layout)
    held_back = params is not None and may_hold_parts(comm, params)
    if held_back:
        lib_dir, covalent, restraints, reference = _restraints_on_master(model, monlib, ligands, params, comm)
    else:
        lib_dir, covalent = _covalent_restraints(model, monlib, ligands, comm)
        restraints = covalent
        reference = None
        if params is not None:
            from .lowres import add_lowres_restraints
            reference = read_model(params.reference_model) if params.reference_model else None
            restraints = add_lowres_restraints(model, restraints, model.xyz, params, reference)
    return Inputs(model=model, restraints=restraints, map=grid, data=data, half_maps=halves,
                  monlib_dir=lib_dir, covalent=covalent, reference=reference, half_map_fsc=half_fsc,
                  half_coefficients=tuple(kept) or None, map_coefficients=map_coefficients,
                  held_back=held_back, params=params, layout=layout)


def _choose_layout(params: RefineParams, n_atoms: int, grid, comm, stored: dict | None):
    """(the parameters with the half-set layout of this run, the choice: parallel.budget)."""
    lean = replace(params, halfset_layout="shared", whole_model_on_workers=False)
    n_voxels = 0 if grid is None else int(np.prod(grid.data.shape))
    choice = choose_layout(params, n_atoms, n_voxels, comm, may_hold_parts(comm, lean), stored)
    return replace(params, halfset_layout=choice.halfset_layout,
                   whole_model_on_workers=choice.whole_model_on_workers), choice


def _covalent_restraints(model: Model, monlib: str | None, ligands: list[str], comm=None):
    """(monomer library directory, the model's restraints from it). With a communicator of
    several ranks (collective over it), one rank builds them and sends them to the others: built
    once, not by every rank at once (at a million atoms 5 s of one rank alone, 11 s each with
    three ranks sharing two cores). The builder is the last rank, which builds while the master
    weights the full map (and rank 1 checksums the inputs, run_refine)."""
    if comm is None or comm.Get_size() == 1:
        return library_restraints(model, monlib, ligands)
    from .parallel.distributed import made_once
    return made_once(comm, lambda: library_restraints(model, monlib, ligands),
                     root=comm.Get_size() - 1, what="building the restraints")


def _restraints_on_master(model: Model, monlib: str | None, ligands: list[str], params: RefineParams,
                          comm):
    """(monomer library directory, covalent restraints, every restraint, reference model) when
    the workers may keep only parts of the restraints (may_hold_parts; collective over comm):
    the master alone builds them, the low-resolution ones too, and the others get the directory
    (and the same InputError, when there is one) but no restraints: run_refine gives each worker
    its part, cut by the master (_hold_part), or the whole set when they turn out to need it
    (_restraints_to_workers). A worker never holds the whole set then: at a million atoms it
    is 230 MB, received and cut by every worker, which set each one's peak from 8 workers on."""
    from .lowres import add_lowres_restraints
    from .parallel.distributed import made_once

    held = {}

    def build():
        lib_dir, covalent = library_restraints(model, monlib, ligands)
        reference = read_model(params.reference_model) if params.reference_model else None
        held.update(covalent=covalent, reference=reference,
                    restraints=add_lowres_restraints(model, covalent, model.xyz, params, reference))
        return lib_dir
    lib_dir = made_once(comm, build, root=0, what="building the restraints")
    return lib_dir, held.get("covalent"), held.get("restraints"), held.get("reference")


def _restraints_to_workers(ctx, inputs: Inputs):
    """The whole set of restraints on every rank (collective over the world): the master's,
    sent to the workers when _restraints_on_master left them without (else as they are)."""
    from .parallel.distributed import made_once

    if inputs.held_back:
        got = made_once(ctx.world, lambda: inputs.restraints, root=0, what="sending the restraints")
        if not ctx.is_master:
            inputs.restraints = got
        inputs.held_back = False
    return inputs.restraints


def retarget_lowres(inputs: Inputs, params: RefineParams, xyz: np.ndarray) -> GeometryTerm:
    """The low-resolution restraints rebuilt from xyz (the prepared model) instead of the input
    model, and their geometry term: after a rotamer step, the rotamer restraints must hold the
    side chains it placed, not pull them back to the input's rotamers. Deterministic in xyz, so a
    continued run rebuilds the same terms."""
    from .lowres import add_lowres_restraints
    log.info("low-resolution restraints rebuilt from the model the rotamer step left")
    inputs.restraints = add_lowres_restraints(inputs.model, inputs.covalent, xyz, params, inputs.reference)
    return GeometryTerm(inputs.restraints, params)


def may_hold_parts(comm, params: RefineParams) -> bool:
    """What workers_hold_parts asks of the parameters and the ranks (comm: the world), before the
    NCS search decides the rest. The workers' part of the restraints is then all a worker keeps
    of them, and the master builds them: the builder holds the whole set, its build's
    temporaries and the model at once (a worker that built them peaked at 1,032 MB against
    876-896 MB for the others, a million atoms and 4 workers), where the master holds more than
    that anyway (4.3 GB, unchanged)."""
    from .protocol.steps import split_protocol

    if comm is None or comm.Get_size() < 3 or params.whole_model_on_workers:
        return False
    pre, _, post = split_protocol(params.protocol)
    return (params.halfset_layout == "shared" and not pre and not post
            and not (params.cycle_rotamers and params.macro_cycles > 1))


def workers_hold_parts(ctx, params: RefineParams, minimiser, idealize_only: bool = False) -> bool:
    """Whether each worker holds only its part of the restraints (decompose.PartRestraints),
    under a decomposition of the start model fixed for the run, instead of the whole set: with
    whole_model_on_workers off, two workers or more and the shared half-set layout (every
    minimisation shared by all the workers, so one decomposition serves them all), and when
    nothing but those minimisations reads the restraints on a worker: no NCS, no protocol steps
    besides the macro-cycles and no rotamer step between them (each rebuilds or reads the whole
    set). The same answer on every rank."""
    return (not idealize_only and ctx is not None and may_hold_parts(ctx.world, params)
            and isinstance(minimiser, RankMinimiser))


PARTS_TAG = 33               # a worker's part of the restraints, from the master (_hold_part)


def _hold_part(ctx, inputs: Inputs, params: RefineParams):
    """The restraints this rank keeps when the workers hold parts (workers_hold_parts), cut from
    the start model into boxes (decompose.spatial_parts) when the minimisations would exchange
    halos, else into blocks in file order: on a worker its PartRestraints over the workers'
    communicator, with the model's name arrays dropped; the whole set on the master, which logs
    the cut. Collective over the world. The master alone holds the restraints then
    (_restraints_on_master: may_hold_parts holds): it cuts every part in one pass
    (decompose.cut_parts) and sends each worker its own, and the per-atom tables all
    share to all."""
    from .parallel.decompose import AtomTables, atom_blocks, cut_parts, owner_of_atoms, spatial_parts
    from .parallel.distributed import boxes_wanted, made_once, recv_object, send_object

    if not inputs.held_back:
        raise RuntimeError("the workers hold every restraint: they have no part to receive")
    inputs.held_back = False
    model, r = inputs.model, inputs.restraints
    n, parts = model.n_atoms, ctx.n_workers
    boxes = params.target == "fast" and boxes_wanted(n, parts, params)
    if ctx.is_master:
        log.info("workers: each holds the restraints of its %s of the start model (1/%d), not "
                 "the whole set", "box" if boxes else "block", parts)
        t0 = time.perf_counter()
        owner = (spatial_parts(model.xyz, model.res_first_atom, parts) if boxes
                 else owner_of_atoms(atom_blocks(model.res_first_atom, parts), n))
        tables = made_once(ctx.world, lambda: AtomTables.of(r, owner, parts), root=0,
                           what="cutting the restraints")
        sent = 0
        for p, terms in cut_parts(r, tables.owner, parts):
            # (worker p is rank p + 1 of the world: parallel.context.make_context)
            send_object(ctx.world, terms, p + 1, PARTS_TAG)
            sent += sum(a.nbytes for a in vars(terms).values() if isinstance(a, np.ndarray))
        log.info("workers: their parts cut by the master and sent in %.1f s (%.1f MB, and %.1f MB "
                 "of per-atom tables to every worker)", time.perf_counter() - t0, sent / 1e6,
                 sum(a.nbytes for a in vars(tables).values()) / 1e6)
        return r
    tables = made_once(ctx.world, lambda: None, root=0, what="cutting the restraints")
    part = PartRestraints.received(recv_object(ctx.world, 0, PARTS_TAG), tables, ctx.workers.Get_rank(),
                                   parts, ctx.workers)
    inputs.restraints, inputs.covalent, inputs.reference = part, None, None
    # nor the names of the atoms, residues and chains, which only the master's outputs and
    # validations read (50 MB at a million atoms), nor, when the data term is the fast target
    # (boxes), the B-factors, elements and residue indices, which only the master's outputs and
    # statistics and the density-fit target read (24 MB)
    model.atom_name = model.res_name = model.chain = model.altloc = None
    if boxes:
        model.b = model.element = model.res_index = None
    return part


def atom_weights(model: Model) -> np.ndarray:
    """Weights of atoms in the real-space target: each refined (non-hydrogen) atom's occupancy
    (clipped to [0, 1]), its share of the density at its centre. With weight 1 for every atom,
    a weak conformer was pulled into the stronger density (`python scripts/bench_occupancy.py
    --resolutions 3 --noise 0.3 --pipeline fast`: occupancies after minimise,occupancy MAE 0.097,
    r 0.62, against 0.074, r 0.74 with these weights).

    The occupancies themselves (not a copy: 8 MB at a million atoms, on every rank) when they
    all lie within [0, 1]; nothing writes into either."""
    occ = np.asarray(model.occ, dtype=np.float64)
    if len(occ) and occ.min() >= 0.0 and occ.max() <= 1.0:
        return occ
    return np.clip(occ, 0.0, 1.0)


def model_statistics(model: Model, xyz: np.ndarray, geom: GeometryTerm, inputs: Inputs,
                     resolution: float, with_map: bool = True, b=None, occ=None, copies=None,
                     known: dict | None = None) -> dict:
    """Geometry statistics of xyz and, with_map, its CC_mask (the model map with B-factors b and
    occupancies occ when given, e.g. after an adp or occupancy step, else the model's own).
    known: geom.statistics(xyz) when the caller has them (the minimisation that made xyz).

    copies: the NcsInfo of an asymmetric unit whose copies the file's assembly operators make
    (info.virtual): then the clashes and CC_mask are the whole assembly's (the asymmetric unit's
    clashes in every copy plus those between copies, also given as clashes_between_copies; the
    model map and mask of every copy), as a model holding all the copies would give."""
    geometry = geom.statistics(xyz) if known is None else known
    stats = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in geometry.items()}
    if copies is not None:
        from .ncs import clashes_between_copies
        between = clashes_between_copies(copies, xyz, geom.r)
        stats["clashes"] = copies.groups[0].n_copies * stats["clashes"] + between
        stats["clashes_between_copies"] = between
    if inputs.data is not None and with_map:
        who = model
        if copies is not None:
            from types import SimpleNamespace

            from .ncs import expanded
            xyz, atoms = expanded(copies, xyz)
            b = (model.b if b is None else np.asarray(b))[atoms]
            occ = (model.occ if occ is None else np.asarray(occ))[atoms]
            who = SimpleNamespace(element=model.element[atoms], b=b, occ=occ)
        stats["cc_mask"] = round(cc_mask(who, xyz, inputs.data, inputs.map.origin, inputs.map.voxel,
                                         resolution, b, occ), 4)
    return stats


def _format_stats(s: dict) -> str:
    txt = f"bonds {s['bond_rmsd']:.4f} A  angles {s['angle_rmsd']:.2f} deg  clashes {s['clashes']}"
    if "clashes_between_copies" in s:
        txt += f" (all copies; {s['clashes_between_copies']} between copies)"
    if "cc_mask" in s:
        txt += f"  CC_mask {s['cc_mask']:.4f}"
    return txt


def run_refine(model_path: str, outdir: str, resolution: float, params: RefineParams,
               map_path: str | None = None, half_maps=None, monlib: str | None = None,
               ligands: list[str] | None = None, overwrite: bool = False, command: str = "",
               idealize_only: bool = False, world=None, restart: str | None = None,
               resume: bool = False, force: bool = False) -> dict:
    """Refine (or idealise) a model; returns the report written to outdir/report.json.

    With a world communicator of several ranks, every rank runs this driver: the workers share
    each minimisation (RankMinimiser), rank 0 alone writes outputs and logs.

    With half maps, the half-set validation stage (halfset.run_halfset) runs first; unless a
    weight is given or params.weight_by is "geometry", the final refinement runs at the weight
    it derives from the free residual. Otherwise every macro-cycle chooses its weight by the
    geometry limits (engine.choose_weight).

    Checkpoints (refine only): the master keeps outdir/checkpoint.h5 (checkpoint.py) current at
    step boundaries (a half-set task, a minimisation of the final refinement) by wall time and
    step count; SIGUSR1/SIGTERM stop every rank after the step in flight with a checkpoint
    (errors.Interrupted, exit code 75). restart=PATH continues from a checkpoint; resume=True
    continues from outdir's checkpoint when there is one. The driver is deterministic, so a
    continued run replays the completed minimisations of the macro-cycle in progress from the
    checkpoint and ends where an uninterrupted run ends.
    """
    from . import checkpoint as ck
    from .errors import Interrupted
    from .parallel.context import release_free_memory
    from .parallel.interrupt import Interrupts

    t_start = time.perf_counter()
    timer = Timer()
    ctx = make_context(world) if world is not None else None
    is_master = ctx is None or ctx.is_master
    ckpt_path = os.path.join(outdir, ck.NAME)
    if restart is None and resume and os.path.exists(ckpt_path):
        restart = ckpt_path
    if restart is not None and idealize_only:
        raise InputError("idealize does not checkpoint: run it again instead of --restart")
    stored_layout = None
    if restart is not None:
        meta = ck.read_meta(restart)
        stored_layout = meta["layout_choice"]
        if resume and meta["state_stage"] == "done" and os.path.exists(os.path.join(outdir, "report.json")):
            if is_master:
                print(f"hpcrefine: the run in {outdir} has finished already; nothing to resume")
            return json.loads(open(os.path.join(outdir, "report.json")).read())
        if os.path.abspath(os.path.dirname(restart)) != os.path.abspath(outdir):
            check_output_dir(outdir, overwrite)
    else:
        check_output_dir(outdir, overwrite)
    hashes = None
    if ctx is not None and ctx.size > 1 and ctx.rank == 1 and not idealize_only:
        # the checksums of the inputs for the checkpoint (3 s for two 480^3 half maps), made by
        # rank 1 in a thread while it waits for the model, the master's map and the restraints
        hashes = ck.hash_ahead([model_path, map_path, *(half_maps or [])])
    with timer("read inputs"):
        inputs = load_inputs(model_path, map_path, half_maps, monlib, ligands or [],
                             need_map=not idealize_only, params=params,
                             comm=ctx.world if ctx is not None else None,
                             share_map=ctx is None or ctx.size == 1, stored_layout=stored_layout)
        release_free_memory()
    # the parameters as given identify the run (a checkpoint's); from here on, the layout chosen
    requested, params = params, inputs.params
    lean = not params.whole_model_on_workers and fixed_mmap_threshold()
    ident = None
    state = ck.RunState()
    if not idealize_only:
        maps = [p for p in [map_path, *(half_maps or [])] if p]

        def identity():
            return ck.RunIdentity.of(model_path, maps, requested.to_dict(), ctx.size if ctx else 1,
                                     command, inputs.monlib_dir, None if hashes is None else hashes())
        if ctx is None or ctx.size == 1:
            ident = identity()
        else:
            # rank 1's checksums of the inputs (hash_ahead above), sent to every rank
            from .parallel.distributed import made_once
            ident = made_once(ctx.world, identity, root=1, what="checksumming the inputs")
        if restart is not None:
            ck.check_compatible(restart, ident, force)
            state = ck.load_state(restart, inputs.model.n_atoms)
    if ctx is not None and ctx.size > 1:
        check_rank_count(ctx, inputs.model)
        # every rank has checked the inputs before rank 0 writes; the workers, done first, wait
        # sleeping (a blocking Barrier spun their cores while the master weighted the full map)
        from .parallel.distributed import wait_quietly
        wait_quietly(ctx.world, ctx.world.Ibarrier())
        install_abort_on_error(ctx.world)
    interrupts = Interrupts(ctx.world if ctx is not None else None) if not idealize_only else None
    minimiser = RankMinimiser(ctx, inputs.model.res_first_atom, interrupts) if ctx is not None else minimise
    # every input is valid: from here on outputs may be written
    logfile = os.path.join(outdir, "refine.log")
    if is_master:
        os.makedirs(outdir, exist_ok=True)
        if os.path.exists(logfile) and restart is None:
            os.remove(logfile)
    setup_logging(0 if is_master else ctx.rank, logfile if is_master else None)
    if ctx is not None and ctx.size > 1 and inputs.map is not None:
        # the map of the data term, prepared by the master and memory-mapped by every rank
        from .parallel.mapstore import MapStore, store_dir
        with timer("read inputs"):
            inputs.store = MapStore(ctx, store_dir(outdir, ctx, inputs.map.data.nbytes))
            master_data = inputs.data
            inputs.data = inputs.store.publish("map", lambda: master_data)
            del master_data
            coefficients = inputs.take_map_coefficients()
            if coefficients is not None and not idealize_only:   # written in the store's thread
                inputs.store.prefetch("map_coefficients", lambda c=coefficients: c, dtype=np.complex64)
                del coefficients
    mpi_lib = ""
    if ctx is not None:
        from mpi4py import MPI
        mpi_lib = MPI.Get_library_version().splitlines()[0].strip()
    for line in run_header(command, ctx.size if ctx else 1, mpi_lib):
        log.info(line)
    if restart is not None:
        log.info("continuing from checkpoint %s (stage %s, macro-cycle %d, %d steps done, restart %d)",
                 restart, state.stage, state.cycle, state.steps, state.restarts)
    if ctx is not None:
        log.info("ranks: %d (rank 0 master without numerics, %d worker(s) sharing each minimisation)",
                 ctx.size, ctx.n_workers)
    log.info("parameters: %s", json.dumps(params.to_dict()))
    if ctx is not None and ctx.size > 2:
        choice = inputs.layout
        log.info("half-set layout: %s%s (halfset_layout %s: %s)", choice.halfset_layout,
                 "" if choice.whole_model_on_workers else ", whole_model_on_workers = false",
                 requested.halfset_layout, choice.reason)
        if choice.warning and is_master:         # (the same on every rank)
            log.warning(choice.warning)
    if lean:
        log.info("memory: glibc's mmap threshold fixed (%s bytes): freed arrays go back to the "
                 "system at once (whole_model_on_workers = false)",
                 os.environ.get(MMAP_THRESHOLD_ENV, MMAP_THRESHOLD))
    model = inputs.model
    r = inputs.restraints
    log.info("model %s: %d atoms, %d residues, %d chains", model_path, model.n_atoms, model.n_residues,
             len(set(model.res_chain.tolist())))
    log.info("monomer library: %s", inputs.monlib_dir)
    if r is not None:                   # (on the master, and on every rank unless held back)
        log.info("restraints: %s", ", ".join(f"{v} {k}" for k, v in r.counts().items()))
    if inputs.map is not None:
        g = inputs.map
        log.info("map %s: grid %s, voxel %s A, origin %s A", g.path, g.shape_xyz,
                 np.round(g.voxel, 3).tolist(), np.round(g.origin, 2).tolist())
    ncs_report = None
    copies = None                    # the NCS of an asymmetric unit whose copies are virtual
    if not idealize_only:            # NCS: copies found, mode chosen and logged (hpcrefine.ncs)
        from . import ncs
        with timer("ncs"):
            minimiser, ncs_report = ncs.setup(model, lambda: _restraints_to_workers(ctx, inputs), params,
                                              minimiser, ctx, interrupts)
        info = getattr(minimiser, "info", None)
        copies = info if getattr(info, "virtual", False) else None
    if not is_master:
        # the gemmi Structure serves the master's output; past the NCS search a worker needs
        # only the arrays (0.12 GB less per worker at a million atoms)
        model.st = None
        release_free_memory()
    if workers_hold_parts(ctx, params, minimiser, idealize_only):
        # each worker keeps only its part of the restraints for the rest of the run
        r = _hold_part(ctx, inputs, params)
        release_free_memory()            # (the whole set is let go of here, when it was held)
    else:
        r = _restraints_to_workers(ctx, inputs)

    geom = GeometryTerm(r, params)
    # (a worker holding a part reads the start only: no second copy of a million atoms' coordinates)
    xyz0 = model.xyz if isinstance(r, PartRestraints) else model.xyz.copy()
    if held_in_boxes(r):
        # a worker holding a box keeps only its atoms' start through the half sets: each task's
        # start and the final stage's make the whole model again from the parts
        from .parallel.distributed import BoxedCoordinates
        xyz0 = BoxedCoordinates(ctx.workers, xyz0, r.owner)
        model.xyz = None
    before = None
    # the start model's statistics: the master's, or one worker's, made in a thread of its own
    # while the master prepares the half maps (the workers have nothing to do then) and sent to
    # the master at the end
    start_stats = _start_statistics_rank(ctx, inputs, params, state, idealize_only)
    # ... without its CC_mask, which the start model's validation brings (the same model map:
    # mapfit.analyse): made twice, the second took 2-3 s of a core in that window at a million
    # atoms, when the master's maps are what every rank waits for
    start_cc = start_stats is not None and copies is None and inputs.data is not None
    pending_start = None
    if is_master and start_stats is None:
        with timer("statistics"):
            before = model_statistics(model, xyz0, geom, inputs, resolution, copies=copies)
        log.info("start: %s", _format_stats(before))
    elif ctx is not None and ctx.rank == start_stats:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="start-statistics")
        pending_start = pool.submit(model_statistics, model, xyz0, GeometryTerm(r, params), inputs,
                                    resolution, copies=copies, with_map=not start_cc)
        pool.shutdown(wait=False)           # the thread ends with its one task

    writer = None
    if is_master and not idealize_only:
        from .parallel.decompose import atom_blocks
        layout = {"workers": ctx.n_workers if ctx else 1, "halfset_layout": params.halfset_layout,
                  "whole_model_on_workers": params.whole_model_on_workers,
                  "block_bounds": atom_blocks(model.res_first_atom, ctx.n_workers if ctx else 1).tolist()}
        writer = ck.CheckpointWriter(ckpt_path, ident, layout, model.b, params.seed, t_start,
                                     source=restart)
        if restart is None:
            state.frames.append((xyz0, {"stage": "start"}))
    progress = None
    if is_master and not idealize_only:       # one line per step; a bar when stderr is a terminal
        from .progress import Progress, StepFigures
        g = inputs.map
        progress = Progress(StepFigures(r, inputs.data, g.origin if g else None,
                                        g.voxel if g else None)).start()
    steps = _Steps(ctx, state, writer, interrupts, params, minimiser, timer, progress)
    try:
        if idealize_only:
            with timer("minimise"):
                from .protocol.idealise import Tether
                anchor = Tether(xyz0, params.idealize_anchor_sigma)
                res = minimiser(xyz0, anchor, geom, 1.0, params.iterations * params.macro_cycles, params)
            xyz, weight, halfset, last = res.xyz, None, None, None
            cycles = [{"cycle": 1, "iterations": res.iterations, "evaluations": res.evaluations,
                       "seconds": round(res.seconds, 2)}]
        else:
            xyz, weight, halfset, cycles, last = _refine_stages(ctx, inputs, geom, params, resolution,
                                                                xyz0, outdir, state, steps, timer)
    except Interrupted:
        if writer is not None:
            writer.finish()
        _start_statistics_done(ctx, start_stats, pending_start)
        log.warning("stopping on %s: checkpoint %s written after the step in flight; continue with "
                    "--resume (exit code %d)", interrupts.describe(), ckpt_path, ck.INTERRUPTED_EXIT)
        if inputs.store is not None:
            inputs.store.close()
        interrupts.finish()
        raise
    finally:
        if interrupts is not None:
            interrupts.finished()
        if progress is not None:
            progress.close()
        from .parallel.distributed import release_kept_list
        release_kept_list()            # the minimisations' neighbour list (not needed from here on)

    if start_stats is not None:
        before = _start_statistics_done(ctx, start_stats, pending_start, show=not start_cc)
    # a worker validates the start model and, with three ranks or more, the last worker the
    # final model, while the master writes the model and makes its statistics (the workers have
    # nothing else to do by then; at a million atoms writing the model, its statistics and each
    # validation took 7-12 s each); with two ranks the master validates the final model
    helper = (None if idealize_only or ctx is None or ctx.size < 2 or not params.whole_model_on_workers
              else VALIDATION_RANK)
    final_rank = ctx.size - 1 if helper is not None and ctx.size > 2 else None
    final_args = (None, None) if idealize_only else (state.b, state.occ)
    # the final model's CC_mask comes from the worker that validates it, which makes the same
    # model map (mapfit.analyse): the master would make it again (10-20 s of the end at a
    # million atoms, when the two validations and the master's work share two cores)
    final_cc = final_rank is not None and copies is None and inputs.data is not None
    # the map's transform, written ahead by the master when the FSC weighting made it, else made
    # here by the master (collective)
    from .simulate import _rfftn
    map_coefficients = (inputs.store.publish("map_coefficients",
                                             lambda: _rfftn(np.asarray(inputs.data, dtype=np.float32)),
                                             dtype=np.complex64)
                        if not idealize_only and inputs.store is not None and inputs.half_maps is not None
                        else None)
    if helper is not None:
        from .validation import validate_model, write_outputs

        # with the half maps' FSC the master computed (a few hundred numbers; two transforms of
        # the box on the worker otherwise); each worker writes its model's files (plots, 1-2 s
        # at 165,000 atoms) after sending its figures
        def validated(x, b=None, occ=None, fsc=None, refinement_cc=False):
            return validate_model(model, x, inputs.restraints, inputs.map, inputs.data,
                                  inputs.half_maps, resolution, b=b, occ=occ, half_map_fsc=fsc,
                                  with_refinement_cc=refinement_cc, map_coefficients=map_coefficients)

        def written(prefix):
            def write(res):
                res.pop("refinement_cc_mask", None)      # the master's, sent with the rest
                write_outputs(res, outdir, prefix=prefix)
            return write

        if final_rank is not None:
            _hand_to(ctx, final_rank, VALIDATION_TAG, (xyz, *final_args, inputs.half_map_fsc, final_cc),
                     validated, then=written("validation_final"))
        _hand_to(ctx, helper, VALIDATION_TAG, (inputs.half_map_fsc, start_cc),
                 lambda fsc, cc: validated(xyz0, fsc=fsc, refinement_cc=cc), then=written("validation_start"))
    if not is_master:
        _rank_resources(ctx)
        return {}
    stem = os.path.join(outdir, "idealized" if idealize_only else "refined")
    with timer("write"):
        written = write_model(updated_structure(model, xyz, None if idealize_only else state.b,
                                                None if idealize_only else state.occ), stem)
    with timer("statistics"):
        # the geometry of the last macro-cycle's minimisation when it made the final model (its
        # workers' shares: 2 s of the master's end at a million atoms, made again before)
        after = model_statistics(model, xyz, geom, inputs, resolution, b=final_args[0], occ=final_args[1],
                                 copies=copies, with_map=not final_cc, known=None if copies is not None else last)
    if not final_cc:
        log.info("final: %s", _format_stats(after))
    rms_shift = float(np.sqrt(np.mean(np.sum((xyz - xyz0) ** 2, axis=1))))
    validation = {}
    if not idealize_only:
        elsewhere = {} if helper is None else {"start": (ctx.world, helper)}
        if final_rank is not None:
            elsewhere["final"] = (ctx.world, final_rank)
        with timer("validation"):
            taken = {}
            validation = _validate(model, {"start": (xyz0, None, None), "final": (xyz, state.b, state.occ)},
                                   inputs, resolution, outdir, elsewhere=elsewhere, taken=taken,
                                   map_coefficients=map_coefficients)
        if start_cc:
            before["cc_mask"] = round(taken["start"], 4)
            log.info("start: %s", _format_stats(before))
        if final_cc:
            after["cc_mask"] = round(taken["final"], 4)
            log.info("final: %s", _format_stats(after))
    if writer is not None:
        # the finished run's checkpoint is written while the ranks gather their figures and the
        # map store is removed (1-2 s each at a million atoms); complete before the report
        state.stage = "done"
        writer.write(state, "done", wait=False)
    resources = _rank_resources(ctx)          # collective: every rank's peak memory and evaluations
    map_store = None
    if inputs.store is not None:
        map_store = inputs.store.close()
        if map_store["maps"]:                 # the master's (the workers returned above)
            log.info("map store: %d maps, %.2f GB written to %s (removed)", map_store["maps"],
                     map_store["bytes"] / 1e9, map_store["directory"])
    report = {
        "program": "hpcrefine", "version": __version__, "command": command,
        "mode": "idealize" if idealize_only else "refine",
        "model": os.path.abspath(model_path),
        "maps": {"map": map_path, "half_maps": list(half_maps) if half_maps else None},
        "resolution": resolution, "parameters": params.to_dict(),
        "memory": inputs.layout.to_dict() if inputs.layout is not None else None,
        "n_atoms": model.n_atoms, "restraints": r.counts(),
        "before": before, "after": after, "rms_shift": round(rms_shift, 4),
        "weight": weight, "cycles": cycles, "ranks": ctx.size if ctx else 1, "outputs": [os.path.basename(p) for p in written],
        "halfset": halfset, "validation": validation, "ncs": ncs_report, "protocol": state.protocol,
        "timings": timer.as_dict(), "wall_seconds": round(time.perf_counter() - t_start, 2),
        "master_cpu_seconds": round(time.process_time(), 2), "rank_resources": resources,
        "map_store": map_store,
    }
    if progress is not None:
        report["progress"] = progress.as_dict()
    if writer is not None:
        writer.finish()
        report["restarts"] = state.restarts
        report["elapsed_seconds_all_runs"] = round(writer.elapsed(state), 2)
        report["checkpoint"] = {"file": ck.NAME, "writes": writer.n_writes,
                                "seconds": round(writer.seconds, 3), "bytes": writer.bytes}
    atomic_write_text(os.path.join(outdir, "report.json"), json.dumps(report, indent=1) + "\n")
    log.info("wrote %s and report.json (%.1f s)", ", ".join(os.path.basename(p) for p in written),
             report["wall_seconds"])
    return report


def _rank_resources(ctx) -> list[dict]:
    """Every rank's peak resident memory (getrusage maxrss, MB) and its share of the distributed
    target's evaluations (parallel.distributed.EVALUATION_TOTALS), gathered on the master
    (collective over ctx.world; one small pickled gather at the end of a run)."""
    import resource

    from .parallel.distributed import EVALUATION_TOTALS

    row = {"rank": ctx.rank if ctx is not None else 0,
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
           **EVALUATION_TOTALS.as_dict()}
    if ctx is None or ctx.size == 1:
        return [row]
    from .parallel.distributed import wait_quietly
    wait_quietly(ctx.world, ctx.world.Ibarrier())       # the ranks done first wait sleeping
    return ctx.world.gather(row, root=0) or []


class _Steps:
    """Step boundaries of a refinement: the minimiser that records (and, in a continued run,
    replays) the minimisations of the macro-cycle in progress, the stop agreement of all ranks
    after each step, and the master's checkpoint when one is due or a stop is agreed."""

    def __init__(self, ctx, state, writer, interrupts, params, inner, timer, progress=None):
        self.ctx = ctx
        self.state = state
        self.writer = writer
        self.interrupts = interrupts
        self.params = params
        self.inner = inner
        self.timer = timer
        self.progress = progress        # the master's progress.Progress (None elsewhere)
        self.label = ""                 # what the next minimisation is, for its progress line
        self.i = 0                      # index of the next minimisation in the current cycle
        self.since = 0                  # steps since the last checkpoint

    def minimiser(self, xyz0, term, geom, weight, iterations, params):
        from .checkpoint import CallRecord
        from .engine import MinimiseResult

        i, self.i = self.i, self.i + 1
        if i < len(self.state.calls):
            c = self.state.calls[i]
            return MinimiseResult(xyz=c.xyz.copy(), f=c.f, iterations=c.iterations,
                                  evaluations=c.evaluations, seconds=c.seconds,
                                  statistics=None if c.statistics is None else dict(c.statistics))
        if self.progress is not None:
            self.progress.begin(f"{self.label}, weight {weight:.4g}")
        res = self.inner(xyz0, term, geom, weight, iterations, params)
        if self.progress is not None and self.label.endswith("trial"):
            self.progress.step(f"{self.label}, weight {weight:.4g}", res.xyz, unit=False,
                               seconds=res.seconds, target=float(res.f), iterations=int(res.iterations))
        if self.writer is not None:
            # the master's record, for its checkpoint; a continued run replays it on every rank
            # (checkpoint.load_state). The workers keep none: a copy of the whole model for each
            # minimisation of the macro-cycle (a weight trial's too), 24 MB each at a million atoms
            self.state.calls.append(CallRecord(res.xyz.copy(), float(res.f), int(res.iterations),
                                               int(res.evaluations), float(res.seconds),
                                               None if res.statistics is None else dict(res.statistics)))
        self.boundary()
        return res

    def new_cycle(self) -> None:
        self.state.calls = []
        self.i = 0

    def frame(self, xyz, meta: dict) -> None:
        """A frame of the trajectory, for the master's checkpoint (the workers keep none: each
        would hold a whole model to the end of the run)."""
        if self.writer is not None:
            self.state.frames.append((xyz, meta))

    def task_done(self, key, packed) -> None:
        """The master's record of a finished half-set task (the workers hold no state)."""
        self.state.tasks[key] = packed
        if self.progress is not None and self.writer is not None:
            from .halfset import WEIGHT_FACTORS        # packed: FSC curves, bonds, angles, xyz
            n = 3 * len(self.writer.b)
            self.progress.step(f"half {key[0]}, weight x{WEIGHT_FACTORS[key[1]]:g}",
                               packed[len(packed) - n:].reshape(-1, 3), bond_rmsd=float(packed[-n - 2]),
                               angle_rmsd=float(packed[-n - 1]))
        if self.writer is not None:
            n = len(self.writer.b)
            self.state.frames.append((packed[len(packed) - 3 * n:].reshape(n, 3),
                                      {"stage": "halfset", "half": key[0], "weight_index": key[1]}))
        self.state.steps += 1
        self.since += 1
        self._write_if_due(False)

    def boundary(self, force: bool = False) -> None:
        """Collective over all ranks: after a step, stop everywhere if any rank got a signal."""
        from .errors import Interrupted

        self.state.steps += 1
        self.since += 1
        stop = self._agree()
        self._write_if_due(force or stop, "interrupted" if stop else "running")
        if stop:
            raise Interrupted

    def _agree(self) -> bool:
        ctx = self.ctx
        if ctx is None or ctx.size == 1:
            return self.interrupts.poll()
        from mpi4py import MPI

        from .parallel.distributed import wait_quietly
        buf = np.array([1 if self.interrupts.poll() else 0], dtype=np.int32)
        req = ctx.world.Iallreduce(MPI.IN_PLACE, [buf, MPI.INT], op=MPI.MAX)
        if ctx.is_master:
            wait_quietly(ctx.world, req, on_poll=self.interrupts.poll)
        else:
            req.Wait()
        return bool(buf[0])

    def _write_if_due(self, force: bool, status: str = "running") -> None:
        w = self.writer
        if w is None:
            return
        p = self.params
        due = (force or (p.checkpoint_steps > 0 and self.since >= p.checkpoint_steps)
               or time.monotonic() - w.last_write >= p.checkpoint_seconds)
        if due:
            # a running step's checkpoint is written in a thread while the run goes on; one
            # that stops the run is complete before it returns
            with self.timer("checkpoint"):
                w.write(self.state, status, wait=status != "running")
            self.since = 0

    def interrupted(self) -> None:
        """The half-set stage stopped on a signal: the master checkpoints what it has."""
        self._write_if_due(True, "interrupted")


def _refine_stages(ctx, inputs, geom, params, resolution, xyz0, outdir, state, steps, timer):
    """The protocol steps before the macro-cycles (the "prepare" stage), the half-set stage, the
    macro-cycles of the final refinement and the protocol steps after them, continued from state
    (params.protocol, hpcrefine.protocol.steps). Returns (xyz, weight, half-set report section,
    cycle records, the geometry statistics of xyz under geom when the last minimisation made xyz
    and nothing changed it or the restraints since, else None); refined B, when an adp step ran,
    in state.b, and refined occupancies, when an occupancy step ran, in state.occ."""
    from .errors import Interrupted
    from .protocol.param import ParamRunner
    from .protocol.steps import coordinate_term, run_steps, split_protocol

    same_geom = geom                        # the restraints the run's statistics are made with

    pre, do_minimise, post = split_protocol(params.protocol)
    runner = ParamRunner(ctx, steps.interrupts)
    # the rigid and morph steps' own data term (params.prepare_target)
    coord_term = coordinate_term(inputs, params) if {"rigid", "morph"} & set(pre + post) else None

    progress = steps.progress

    def step_line(name, xyz, record):
        if progress is not None:
            rounds = record.get("rounds", [record])
            progress.step(name, xyz, seconds=sum(r["seconds"] for r in rounds),
                          target=rounds[-1].get("target"), iterations=sum(r["iterations"] for r in rounds))

    def frame(name, xyz, record):
        state.protocol.append(record)
        steps.frame(xyz, {"stage": "prepare", "step": name})
        step_line(name, xyz, record)
    if pre and state.stage == "halfset" and state.prepared is None and not state.tasks:
        state.stage = "prepare"
    if state.stage == "prepare":            # one stage: a continued run restarts it or skips it
        with timer("prepare"):
            state.protocol = []
            if progress is not None:
                progress.stage("prepare", len(pre))
            state.prepared, _, _, _ = run_steps(pre, runner, inputs, xyz0, inputs.model.b, coord_term,
                                                geom, params, on_step=frame)
        state.stage = "halfset"
        steps.boundary(force=True)
    if state.prepared is not None:          # the refinement starts from the prepared model
        xyz0 = state.prepared
        if "rotamer" in pre and params.rotamer_restraints:
            geom = retarget_lowres(inputs, params, xyz0)
    fixed_weight = params.weight
    w_cap = None            # the weight from the free residual, kept within the geometry limits
    halfset = state.halfset
    if inputs.half_maps is not None:
        if state.stage == "halfset":
            with timer("half sets"):
                if progress is not None:
                    from .halfset import WEIGHT_FACTORS
                    progress.stage("halfset", 2 * len(WEIGHT_FACTORS), len(state.tasks))
                try:
                    halfset, w_half = _half_sets(ctx, inputs, geom, params, resolution, xyz0, outdir,
                                                 state, steps, _final_maps_ahead(inputs, params,
                                                                                 do_minimise))
                except Interrupted:
                    steps.interrupted()
                    raise
            state.halfset, state.w_half, state.stage = halfset, w_half, "final"
            steps.boundary(force=True)
        inputs.take_half_coefficients()       # let go of them when no half set took them
        w_half = state.w_half
        if fixed_weight is None and params.weight_by == "halfset" and params.target == "fit":
            log.info("the half sets refine with the fast target, whose weight does not carry "
                     "over to the density-fit target: the final weight follows the geometry limits")
        elif fixed_weight is None and params.weight_by == "halfset":
            w_cap = w_half
            log.info("final refinement at the weight from the free residual, %.3f, or lower "
                     "where the geometry limits require", w_half)
    boxed = hasattr(xyz0, "whole")          # a worker's parts of the start (BoxedCoordinates)
    # built after the half sets, which do not use it: its map (a full-grid copy) is not held then
    # (boxes: the fast target, which reads no model)
    data_term, blur_start = _data_term(inputs, params, resolution, None if boxed else xyz0)
    state.stage = "final"
    if state.xyz is None:
        # (a worker holding a part of the restraints writes no frames and changes no coordinates
        # in place: no second copy of the start; a worker holding a box keeps its parts of the
        # start, and of every minimisation's result: RankMinimiser)
        state.xyz = xyz0 if isinstance(geom.r, PartRestraints) else xyz0.copy()
    xyz, weight, cycles = state.xyz, state.weight, state.cycles
    if params.cycle_rotamers and params.rotamer_restraints and 1 < state.cycle <= params.macro_cycles:
        # continued after a macro-cycle's rotamer step: its restraints, from the model it left
        geom = retarget_lowres(inputs, params, xyz)
    minimiser = steps.minimiser
    last = None
    if progress is not None:
        progress.stage("final", params.macro_cycles if do_minimise else 0, state.cycle - 1)
    for cycle in range(state.cycle, (params.macro_cycles if do_minimise else 0) + 1):
        blur = cycle_blur(blur_start, cycle, params.macro_cycles)
        term = data_term.blurred(blur) if blur > 0 else data_term
        if params.fix_chirality:
            xyz = _put_back_chirals(xyz, geom.r, cycle)
        kept: dict = {}
        with timer("weight"):
            if fixed_weight is not None:
                weight, trials = fixed_weight, []
            else:
                w0 = w_cap or weight or initial_weight(xyz, term, geom)
                log.info("cycle %d: choosing the data weight (map blur %.0f A^2)", cycle, blur)
                steps.label = f"cycle {cycle} weight trial"
                weight, trials = choose_weight(xyz, term, geom, params, w0, minimiser, w_max=w_cap,
                                               kept=kept)
        with timer("minimise"):
            steps.label = f"cycle {cycle} minimise"
            res = continue_trial(minimiser, xyz, term, geom, weight, params, kept)
        xyz = res.xyz
        rotamers = None
        if params.cycle_rotamers and cycle < params.macro_cycles:
            # side chains refitted between macro-cycles; the next one refines what the step placed
            from .protocol.rotamer_fit import rotamer_step
            with timer("rotamer"):
                xyz, rotamers = rotamer_step(runner, inputs, xyz, params, params.cycle_rotamer_select)
            log.info("cycle %d: rotamer fit changed %d of %d side chains (%d searched)", cycle,
                     rotamers["changed"], rotamers["residues"], rotamers["searched"])
            if params.rotamer_restraints:
                geom = retarget_lowres(inputs, params, xyz)
        st = geometry_of(res, geom) if rotamers is None else geom.statistics(xyz)
        last = st if geom is same_geom else None
        cycles.append({"cycle": cycle, "map_blur": blur, "weight": weight, "iterations": res.iterations,
                       "evaluations": res.evaluations, "seconds": round(res.seconds, 2),
                       "bond_rmsd": round(st["bond_rmsd"], 4), "angle_rmsd": round(st["angle_rmsd"], 3),
                       "weight_trials": [asdict(t) for t in trials]})
        if rotamers is not None:
            cycles[-1]["rotamers_changed"] = rotamers["changed"]
            cycles[-1]["rotamers_searched"] = rotamers["searched"]
            cycles[-1]["rotamer_outliers"] = rotamers["rotamer_outliers_after"]
        if progress is not None:
            progress.step(f"cycle {cycle} minimise, weight {weight:.4g}, map blur {blur:.0f}", xyz,
                          seconds=res.seconds, target=float(res.f), iterations=int(res.iterations),
                          bond_rmsd=st["bond_rmsd"], angle_rmsd=st["angle_rmsd"], clashes=st["clashes"])
        else:
            log.info("cycle %d: weight %.3f, %d iterations (%.1f s): bonds %.4f A, angles %.2f deg",
                     cycle, weight, res.iterations, res.seconds, st["bond_rmsd"], st["angle_rmsd"])
        state.cycle, state.xyz, state.weight = cycle + 1, xyz, weight
        steps.new_cycle()
        steps.frame(xyz, {"stage": "final", "cycle": cycle, "weight": round(weight, 4),
                          "target": round(float(res.f), 4), "iterations": res.iterations,
                          "seconds": round(res.seconds, 2), "bond_rmsd": cycles[-1]["bond_rmsd"],
                          "angle_rmsd": cycles[-1]["angle_rmsd"]})
    if post:
        with timer("protocol"):
            if progress is not None:
                progress.stage("protocol", len(post))
            xyz, state.b, state.occ, records = run_steps(post, runner, inputs, xyz, inputs.model.b,
                                                         coord_term, geom, params, on_step=step_line)
        state.protocol = state.protocol + records
        last = None
    return xyz, weight, halfset, cycles, last


def cycle_blur(blur_start: float, cycle: int, macro_cycles: int) -> float:
    """The extra map blur (A^2) of final macro-cycle `cycle` (1..macro_cycles): blur_start in
    the first, falling linearly to 0 in the last."""
    return blur_start * (macro_cycles - cycle) / max(macro_cycles - 1, 1)


def _final_maps_ahead(inputs: Inputs, params: RefineParams, do_minimise: bool):
    """run_halfset's prefetch: the master starts writing, while the workers refine the half
    sets, the maps the final stage publishes on the way (the full map's blurred copies of the
    macro-cycles, the rotamer step's map), each of which made the workers wait 0.5-2 s at
    165,000 atoms. None when nothing would be published (one process, the density-fit target)."""
    if inputs.store is None or not do_minimise or params.target != "fast":
        return None

    def start(final_term):
        for cycle in range(1, params.macro_cycles + 1):
            final_term.prefetch_blurred(cycle_blur(params.map_blur_start, cycle, params.macro_cycles))
        if params.cycle_rotamers and params.macro_cycles > 1:
            from .protocol.rotamer_fit import prefetch_scoring_map
            prefetch_scoring_map(inputs, params)
    return start


def _put_back_chirals(xyz: np.ndarray, r, cycle: int) -> np.ndarray:
    """The macro-cycle's start with its inverted chiral centres put back (the same on every rank;
    collective over the workers when they hold parts of the restraints). Parts of the start
    (distributed.BoxedCoordinates) are made whole for it, and parts are returned."""
    from .parallel.distributed import BoxedCoordinates, correct_inversions
    held = xyz if isinstance(xyz, BoxedCoordinates) else None
    fixed, made, left = correct_inversions(xyz if held is None else held.whole(), r)
    if made:
        log.info("cycle %d: inverted chiral centres put back: %d reflection(s), %d still inverted",
                 cycle, made, left)
    if not made:
        return xyz
    return fixed if held is None else BoxedCoordinates(held.comm, fixed, held.owner)


VALIDATION_RANK = 1        # the worker that validates the start model (runs of several ranks;
                           # the last worker validates the final model with three ranks or more)
VALIDATION_TAG = 29        # outside the half-set tags (39-63) and the others in use
START_STATISTICS_TAG = 31


def _hand_to(ctx, rank, tag: int, args: tuple, compute, then=None) -> None:
    """The master sends args to worker `rank`, which sends back compute(*args) (the master
    receives it later with recv_object from `rank`, `tag`) and then, given `then`, calls
    then(result) itself; other ranks do nothing."""
    from .parallel.distributed import recv_object, send_object
    if ctx.is_master:
        send_object(ctx.world, args, rank, tag)
    elif ctx.rank == rank:
        result = compute(*recv_object(ctx.world, 0, tag))
        send_object(ctx.world, result, 0, tag)
        if then is not None:
            then(result)


def _start_statistics_rank(ctx, inputs: Inputs, params: RefineParams, state, idealize_only: bool):
    """The worker that makes the start model's statistics (the last rank), or None for the
    master: a worker does when the run begins with the half-set stage, whose maps the master
    prepares alone first (not in idealize, without half maps, with protocol steps before the
    half sets, which all the workers run at once, or with whole_model_on_workers off)."""
    from .protocol.steps import split_protocol

    if (idealize_only or ctx is None or ctx.size < 2 or inputs.half_maps is None
            or not params.whole_model_on_workers):
        return None
    pending_prepare = split_protocol(params.protocol)[0] and state.prepared is None
    if state.stage != "halfset" or pending_prepare:
        return None
    return ctx.size - 1


def _start_statistics_done(ctx, rank, pending, show: bool = True):
    """The start statistics made by worker `rank` (_start_statistics_rank; pending: the future
    of its thread): sent by it, received and, with show, logged by the master (returned);
    nothing elsewhere."""
    if rank is None:
        return None
    from .parallel.distributed import recv_object, send_object
    if ctx.is_master:
        before = recv_object(ctx.world, rank, START_STATISTICS_TAG)
        if show:
            log.info("start: %s", _format_stats(before))
        return before
    if pending is not None:
        send_object(ctx.world, pending.result(), 0, START_STATISTICS_TAG)
    return None


def _validate(model, models: dict, inputs: Inputs, resolution: float, outdir: str,
              elsewhere: dict | None = None, taken: dict | None = None, map_coefficients=None) -> dict:
    """The validation figures (hpcrefine.validation) of the start and final models against the
    refinement's map, in the log, in validation_<name>.json/.csv/.png and in the report.
    models: name -> (xyz, B-factors or None, occupancies or None); elsewhere: name -> (comm,
    rank) of the models another rank validates (it sends validate_model's result,
    parallel.distributed.send_object, and writes their files itself), received once this rank's
    own are done; taken: filled with the refinement CC_mask a result brings (name -> value),
    taken out of it; map_coefficients: the map's rfftn when the caller has it."""
    from .simulate import _rfftn
    from .validation import format_summary, json_ready, validate_model, write_outputs

    elsewhere = elsewhere or {}
    mine = [name for name in models if name not in elsewhere]
    # the map's transform and the half maps' FSC serve every model
    if map_coefficients is None and inputs.data is not None and len(mine) > 1:
        map_coefficients = _rfftn(np.asarray(inputs.data, dtype=np.float32))
    results = {}
    for name in mine:
        xyz, b, occ = models[name]
        results[name] = validate_model(model, xyz, inputs.restraints, inputs.map, inputs.data,
                                       inputs.half_maps, resolution, b=b, occ=occ,
                                       map_coefficients=map_coefficients,
                                       half_map_fsc=inputs.half_map_fsc)
        write_outputs(results[name], outdir, prefix=f"validation_{name}")
    del map_coefficients
    if elsewhere:
        from .parallel.distributed import recv_object
        for name, (comm, rank) in elsewhere.items():
            results[name] = recv_object(comm, rank, VALIDATION_TAG)
            if "refinement_cc_mask" in results[name] and taken is not None:
                taken[name] = results[name].pop("refinement_cc_mask")
    out = {}
    for name in models:
        res = results[name]
        log.info("%s model:", name)
        for line in format_summary(res):
            log.info("  %s", line)
        out[name] = json_ready(res)
    return out


def _data_term(inputs: Inputs, params: RefineParams, resolution: float, xyz=None):
    """The data term of the final refinement and the blur of its first macro-cycle (the fit
    target's mask around xyz, by default the start model)."""
    model, grid = inputs.model, inputs.map
    if params.target == "fit":
        mask = atom_mask(model.xyz if xyz is None else xyz, inputs.data.shape, grid.origin, grid.voxel, params.fit_mask_radius)
        term = DensityFitTerm(normalise_map(inputs.data), grid.origin, grid.voxel, mask, model.element,
                              model.b, params.fit_b_blur, occ=model.occ)
        log.info("data term: density fit of a Gaussian-atom model map (mask %.1f A around the atoms, "
                 "%d voxels)", params.fit_mask_radius, int(mask.sum()))
        return term, params.fit_blur_start
    log.info("data term: fast real-space target (map values at atom centres)")
    return fast_term(inputs, "final", lambda: inputs.data, atom_weights(model)), params.map_blur_start


def _half_sets(ctx, inputs: Inputs, geom: GeometryTerm, params: RefineParams, resolution: float,
               xyz0: np.ndarray, outdir: str, state, steps, prefetch=None) -> tuple[dict | None, float]:
    """Run the half-set stage on every rank (skipping the tasks a checkpoint holds); returns
    (report section on the master, final weight on every rank: the master sends it to the
    workers, who wait without spinning). prefetch: run_halfset's."""
    from .errors import Interrupted
    from .halfset import run_halfset

    parallel = ctx is not None and ctx.size > 1

    def share(weight: float) -> float:
        """The master's weight on every rank (NaN: the run stops), the workers waiting sleeping."""
        from .parallel.distributed import wait_quietly
        buf = np.array([weight if ctx.is_master else 0.0])
        wait_quietly(ctx.world, ctx.world.Ibcast(buf, root=0))
        return float(buf[0])
    try:
        section = run_halfset(ctx, inputs, geom, params, resolution, xyz0, atom_weights(inputs.model),
                              outdir, inputs.model.res_first_atom, done=state.tasks,
                              on_task=steps.task_done, interrupts=steps.interrupts,
                              ncs=steps.inner if hasattr(steps.inner, "for_group") else None,
                              prefetch=prefetch)
    except Interrupted:
        # the ranks that stopped meet the workers that finished their tasks, who learn it here
        if parallel:
            share(np.nan)
        raise
    if not parallel:
        return section, float(section["final_weight"])
    weight = share(section["final_weight"] if ctx.is_master else 0.0)
    if not np.isfinite(weight):
        raise Interrupted
    return section, weight
