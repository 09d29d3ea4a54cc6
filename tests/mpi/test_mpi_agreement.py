"""The distributed target and minimisation agree with the single-process engine, for any rank count.

Run under MPI as `mpiexec -n K python -m pytest -q tests/mpi` (tests/test_mpi_launch.py does so for
K = 1, 2, 3, 5). With K >= 2 rank 0 is the master: it runs the single-process reference and
otherwise only waits (quietly) and gathers; the K - 1 workers share the distributed runs. Every
assertion is made on numbers every rank holds, so all ranks pass or fail together.
"""
from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np
import pytest
from mpi4py import MPI

from hpcrefine import datasets, simulate
from hpcrefine.core.lbfgs import lbfgs
from hpcrefine.engine import GeometryTerm, RealSpaceTerm, minimise
from hpcrefine.modelio import read_model, read_structure
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.params import RefineParams
from hpcrefine.parallel.context import make_context
from hpcrefine.parallel.distributed import (distributed_minimise, distributed_target, master_wait_for,
                                            notify_master, wait_quietly)
from hpcrefine.topology import build_restraints

WEIGHT = 15.0          # fixed data weight (the automatic first guess for this start is about 19)
ITERATIONS = 40
WORLD = MPI.COMM_WORLD


@pytest.fixture(scope="module")
def ctx():
    return make_context(WORLD)


@pytest.fixture(scope="module")
def case():
    """adk, 3.5 A maps (seed 1, simulated on rank 0 and broadcast), start shaken by 0.8 A (seed 2)."""
    if WORLD.Get_rank() == 0:
        path = datasets.fetch(["adk_closed"])["adk_closed"]      # download once, before the others
    WORLD.Barrier()
    path = datasets.fetch(["adk_closed"])["adk_closed"]
    model = read_model(path)
    if WORLD.Get_rank() == 0:
        full, _, _, origin, voxel, _ = simulate.simulate_maps(read_structure(path), 3.5, seed=1)
        header = np.array([*full.shape, *origin, *voxel], dtype=np.float64)
    else:
        header = np.empty(9)
    WORLD.Bcast(header, root=0)
    shape = tuple(int(v) for v in header[:3])
    if WORLD.Get_rank() != 0:
        full = np.empty(shape, dtype=np.float32)
    WORLD.Bcast(full, root=0)
    params = RefineParams(resolution=3.5)
    return {"model": model, "r": build_restraints(model, MonomerLibrary()),
            "term": RealSpaceTerm(full, header[3:6], header[6:9], np.ones(model.n_atoms)),
            "xyz0": simulate.shake(model.xyz, 0.8, seed=2), "params": params}


def _engine_fun(case):
    geom = GeometryTerm(case["r"], case["params"])
    term = case["term"]

    def fun(xyz):
        fd, gd = term.target(xyz)
        fg, gg = geom.target(xyz)
        return WEIGHT * fd + fg, WEIGHT * gd + gg
    return fun, geom


def _world_max(values) -> np.ndarray:
    """Element-wise maximum over world (a master without values contributes zeros)."""
    buf = np.array(values, dtype=np.float64)
    WORLD.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return buf


def test_roles(ctx):
    size = WORLD.Get_size()
    assert ctx.size == size
    if size == 1:
        assert ctx.is_master and ctx.is_worker and ctx.workers.Get_size() == 1
    elif WORLD.Get_rank() == 0:
        assert ctx.is_master and not ctx.is_worker         # the master does not compute
    else:
        assert not ctx.is_master and ctx.workers.Get_size() == size - 1


def test_one_evaluation_equals_the_engine(ctx, case):
    """f and g summed over the workers equal the single-process target at the shaken start."""
    rel_f = rel_g = 0.0
    if ctx.is_worker:
        xyz0 = case["xyz0"]
        target = distributed_target(ctx.workers, xyz0, case["term"], case["r"],
                                    case["model"].res_first_atom, WEIGHT, case["params"])
        f, g = target(xyz0.ravel().copy())
        f_ref, g_ref = _engine_fun(case)[0](xyz0)
        rel_f = abs(f - f_ref) / abs(f_ref)
        rel_g = np.max(np.abs(g - g_ref.ravel())) / np.max(np.abs(g_ref))
        if ctx.workers.Get_size() > 1:       # each worker evaluates only part of the terms
            assert len(target.share.bond_idx) < len(case["r"].bond_idx)
    rel_f, rel_g = _world_max([rel_f, rel_g])
    assert rel_f < 1e-12
    assert rel_g < 1e-10


def test_halo_evaluations_equal_the_engine(ctx, case, measured):
    """With boxes (decomposition "boxes"), owned_call exchanges only halos: f and each
    worker's part of g equal the single-process target, also after atoms moved farther than the
    halo allows (which rebuilds the lists from the whole model once)."""
    worst = np.zeros(3)
    if ctx.is_worker:
        comm = ctx.workers
        xyz0 = case["xyz0"]
        fun = _engine_fun(case)[0]
        params = dataclasses.replace(case["params"], decomposition="boxes")
        target = distributed_target(comm, xyz0, case["term"], case["r"], case["model"].res_first_atom,
                                    WEIGHT, params, boxes=True)
        assert (target.halo is not None) == (comm.Get_size() > 1)
        moved = xyz0.copy()
        moved[::50] += 1.5                    # farther than HALO_BUFFER / 2 from the build
        for i, x in enumerate((xyz0, xyz0 + 0.05, moved)):
            f, g_part = target.owned_call(target.own_part(x))
            f_ref, g_ref = fun(x)
            worst[0] = max(worst[0], abs(f - f_ref) / abs(f_ref))
            worst[1] = max(worst[1], np.max(np.abs(g_part - g_ref[target.owned].ravel()), initial=0.0)
                           / np.max(np.abs(g_ref)))
        if target.halo is not None:
            worst[2] = target.halo.n_builds      # the start, then the moved model
            n = len(xyz0)
            measured[f"halo atoms per worker of {comm.Get_size()} (of {n})"] = str(len(target.halo.need))
            measured["bytes sent per evaluation, halo vs whole-model gather"] = \
                f"{target.halo.bytes_per_evaluation()} vs {2 * 8 * (3 * n + 1)}"
    worst = _world_max(worst)
    assert worst[0] < 1e-12
    assert worst[1] < 1e-10
    assert worst[2] in (0, 2)


def test_a_box_rank_holds_its_rows_and_a_halo_found_without_the_whole_model(ctx, case):
    """A rank owning a box keeps arrays of its rows only (BoxTarget.local), and the halo
    its ranks find from their own atoms (HaloExchange.build: bounds and the atoms near them
    swapped) holds every atom within the halo radius of the box and every atom its terms read,
    at the start and after the atoms moved far enough to make the lists again."""
    bad = np.zeros(1)
    if ctx.is_worker and ctx.workers.Get_size() > 1:
        comm = ctx.workers
        xyz0 = case["xyz0"]
        n = len(xyz0)
        params = dataclasses.replace(case["params"], decomposition="boxes")
        target = distributed_target(comm, xyz0, case["term"], case["r"], case["model"].res_first_atom,
                                    WEIGHT, params, boxes=True)
        moved = xyz0.copy()
        moved[::50] += 1.5
        for x in (xyz0, moved):
            target.owned_call(target.own_part(x))
            halo, own = target.halo, target.owned
            d = np.sqrt(((x[:, None, :] - x[None, own, :]) ** 2).sum(-1)).min(axis=1)
            within = np.setdiff1d(np.flatnonzero(d <= halo.radius), own)
            reads = np.setdiff1d(halo.fixed, own)
            held = np.union1d(own, halo.need)
            bad[0] += not (np.all(np.isin(within, halo.need)) and np.all(np.isin(reads, halo.need)))
            bad[0] += not np.all(np.isin(held, target.local))
            # (on a model as small as this one, every atom is within the rows' reach)
            bad[0] += not (len(target.local) <= n and target._xyz.shape == (len(target.local), 3)
                           and target._grad.shape == target._xyz.shape)
            # every row holds its atom's coordinates at the last build (the halo's, current)
            bad[0] += not np.array_equal(target._xyz[np.searchsorted(target.local, held)], x[held])
        bad[0] += target.halo.n_builds != 2
    assert _world_max(bad)[0] == 0


def test_boxes_and_blocks_minimise_alike(ctx, case):
    """The same minimisation with the atoms shared as boxes (halo exchange) and as blocks (the
    whole model gathered) ends at the same coordinates, to summation order."""
    worst = np.zeros(1)
    if ctx.is_worker:
        ends = []
        for decomposition in ("boxes", "blocks"):
            params = dataclasses.replace(case["params"], decomposition=decomposition)
            res, target = distributed_minimise(ctx.workers, case["xyz0"], case["term"], case["r"],
                                               case["model"].res_first_atom, WEIGHT, ITERATIONS, params)
            ends.append(res.xyz)
            assert (target.halo is not None) == (decomposition == "boxes" and ctx.workers.Get_size() > 1)
        worst[0] = np.max(np.abs(ends[0] - ends[1]))
    worst = _world_max(worst)
    assert worst[0] < 1e-6


def _parts(ctx, case, decomposition: str):
    """This worker's PartRestraints of the case's restraints, cut as distributed_target cuts the
    start xyz0 (boxes of spatial_parts, or blocks in file order)."""
    from hpcrefine.parallel.decompose import PartRestraints, atom_blocks, owner_of_atoms, spatial_parts
    comm, model = ctx.workers, case["model"]
    size = comm.Get_size()
    owner = (spatial_parts(case["xyz0"], model.res_first_atom, size) if decomposition == "boxes"
             else owner_of_atoms(atom_blocks(model.res_first_atom, size), model.n_atoms))
    return PartRestraints(case["r"], owner, comm.Get_rank(), size, comm)


def test_a_part_of_the_restraints_minimises_as_the_whole_set(ctx, case):
    """A worker that holds only its part of the restraints (decompose.PartRestraints: its own
    terms, exclusions and 1-4 pairs) minimises bitwise as with the whole set cut the same way,
    as boxes or blocks; the parts hold every term once."""
    same = np.ones(3)                 # a master without work agrees
    if ctx.is_worker:
        comm, r = ctx.workers, case["r"]
        for decomposition in ("boxes", "blocks"):
            params = dataclasses.replace(case["params"], decomposition=decomposition)
            part = _parts(ctx, case, decomposition)
            args = (case["term"], case["model"].res_first_atom, WEIGHT, ITERATIONS, params)
            whole, tw = distributed_minimise(comm, case["xyz0"], case["term"], r, *args[1:])
            mine, tp = distributed_minimise(comm, case["xyz0"], case["term"], part, *args[1:])
            assert (tp.halo is not None) == (tw.halo is not None)
            counts = np.array([len(part.share.bond_idx), len(part.share.plane_start) - 1,
                               len(part.share.excl_pairs), len(part.share.pair14)])
            comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
            same *= [np.array_equal(whole.xyz, mine.xyz) and whole.f == mine.f,
                     whole.statistics == mine.statistics,
                     counts.tolist() == [len(r.bond_idx), r.n_planes, len(r.excl_pairs), len(r.pair14)]]
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert np.all(same == 1.0), same


def test_chained_minimisations_on_the_parts_end_where_the_gathered_ones_do(ctx, case):
    """chained_minimise (a half-set task's minimisations against the map blurred, then sharp, each
    rank holding only its own atoms between them) ends bitwise where distributed_minimise ends
    run twice, the second from the first's gathered result: the coordinates on the first worker
    alone (None on the others), f and the statistics on every worker. One worker holds its part
    as a block, which the chain refuses."""
    from hpcrefine.parallel import distributed
    from hpcrefine.parallel.distributed import chained_minimise

    same = np.ones(4)
    if ctx.is_worker:
        comm = ctx.workers
        params = dataclasses.replace(case["params"], decomposition="boxes")
        part = _parts(ctx, case, "boxes")
        terms = [case["term"].blurred(40.0), case["term"]]
        if comm.Get_size() == 1:
            assert part.blocks is not None
            with pytest.raises(ValueError, match="held in boxes"):
                chained_minimise(comm, lambda: case["xyz0"], iter(terms), part, WEIGHT, 10, params)
            terms = []
    if ctx.is_worker and terms:
        distributed.release_kept_list()
        first, _ = distributed_minimise(comm, case["xyz0"], terms[0], part, None, WEIGHT, 10, params)
        second, _ = distributed_minimise(comm, first.xyz, terms[1], part, None, WEIGHT, 10, params)
        distributed.release_kept_list()
        made = []
        chained = chained_minimise(comm, lambda: made.append(1) or case["xyz0"], iter(terms), part,
                                   WEIGHT, 10, params)
        distributed.release_kept_list()
        root = comm.Get_rank() == 0
        same[:] = [made == [1], chained.f == second.f and chained.statistics == second.statistics,
                   chained.iterations == first.iterations + second.iterations,
                   np.array_equal(chained.xyz, second.xyz) if root else chained.xyz is None]
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert np.all(same == 1.0), same


def test_a_start_held_in_boxes_is_made_whole_again_bit_for_bit(ctx, case):
    """distributed.BoxedCoordinates: each worker keeps only its box's rows of the start,
    whole() gives every worker the start again, to the bit, in an array of its own; a half-set task's start
    made from it (halfset.half_start: shaken, inverted centres put back over the parts) is the
    one made from the whole start."""
    from hpcrefine.halfset import half_start
    from hpcrefine.parallel.distributed import BoxedCoordinates

    same = np.ones(4)
    if ctx.is_worker:
        comm, xyz = ctx.workers, case["xyz0"]
        part = _parts(ctx, case, "boxes")
        held = BoxedCoordinates(comm, xyz, part.owner)
        counts = np.array([len(held.rows)])
        comm.Allreduce(MPI.IN_PLACE, counts, op=MPI.SUM)
        again = held.whole()
        params = dataclasses.replace(case["params"], halfset_start_shake=0.3)
        same[:] = [len(held) == len(xyz) and counts[0] == len(xyz),
                   np.array_equal(again, xyz) and again is not xyz and again.base is None,
                   len(held.rows) == np.count_nonzero(part.owner == comm.Get_rank()),
                   np.array_equal(half_start(held, params, 2, part), half_start(xyz, params, 2, part))]
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert np.all(same == 1.0), same


def test_minimisations_kept_in_parts_end_where_the_gathered_ones_do(ctx, case):
    """distributed_minimise from a start held in boxes (BoxedCoordinates) with keep_parts, then again
    from its result's parts (a final stage's weight trial and the cycle continued from it, on
    workers that never hold the whole model), ends bitwise where the same minimisations from whole
    models end: coordinates (made whole), f and statistics on every worker. A start held in other
    boxes than the restraints is refused."""
    from hpcrefine.parallel import distributed
    from hpcrefine.parallel.distributed import BoxedCoordinates

    same = np.ones(4)
    if ctx.is_worker and ctx.workers.Get_size() > 1:
        comm = ctx.workers
        params = dataclasses.replace(case["params"], decomposition="boxes")
        part = _parts(ctx, case, "boxes")
        args = (case["term"], part, None, WEIGHT, 10, params)
        distributed.release_kept_list()
        first, _ = distributed_minimise(comm, case["xyz0"], *args)
        second, _ = distributed_minimise(comm, first.xyz, *args)
        distributed.release_kept_list()
        held = BoxedCoordinates(comm, case["xyz0"], part.owner)
        first_p = distributed_minimise(comm, held, *args, keep_parts=True)[0]
        second_p = distributed_minimise(comm, first_p.xyz, *args, keep_parts=True)[0]
        distributed.release_kept_list()
        other = BoxedCoordinates(comm, case["xyz0"], (part.owner + 1) % comm.Get_size())
        with pytest.raises(ValueError, match="same boxes"):
            distributed_minimise(comm, other, *args)
        same[:] = [isinstance(first_p.xyz, BoxedCoordinates) and isinstance(second_p.xyz, BoxedCoordinates),
                   np.array_equal(second_p.xyz.whole(), second.xyz),
                   second_p.f == second.f and second_p.statistics == second.statistics,
                   first_p.statistics == first.statistics]
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert np.all(same == 1.0), same


def test_inverted_centres_put_back_by_parts_as_by_the_whole_set(ctx, case):
    """distributed.correct_inversions of the workers' parts (each reflects its own centres, the
    moved atoms exchanged every pass) gives bitwise the coordinates and counts of
    core.geometry.correct_inversions with the whole set."""
    from hpcrefine.core import geometry
    from hpcrefine.parallel.distributed import correct_inversions

    same = np.ones(2)
    if ctx.is_worker:
        r = case["r"]
        xyz = np.array(case["xyz0"])
        # invert one centre in fifteen (every part gets some): reflected through its neighbours
        flip = np.arange(0, len(r.chir_idx), 15)
        geometry.reflect_centres(xyz, r.chir_idx, flip)
        want = geometry.correct_inversions(xyz, r)
        got = correct_inversions(xyz, _parts(ctx, case, "boxes"))
        assert want[1] >= len(flip) // 2
        same[:] = [np.array_equal(want[0], got[0]), want[1:] == got[1:]]
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert np.all(same == 1.0), same


def test_a_continued_minimisation_keeps_the_neighbour_list_and_its_results(ctx, case):
    """A second minimisation from where the first ended (a macro-cycle continued) takes over the
    first's neighbour list, refreshed, instead of building one: the same list object, no new
    whole-list build, and bitwise the coordinates of the same minimisation with a list built
    afresh."""
    from hpcrefine.parallel import distributed

    same = np.ones(2)                 # a master without work agrees
    if ctx.is_worker:
        args = (case["term"], case["r"], case["model"].res_first_atom, WEIGHT, 10, case["params"])
        distributed.release_kept_list()
        first, t1 = distributed_minimise(ctx.workers, case["xyz0"], *args)
        builds = t1.nbl.n_builds
        second, t2 = distributed_minimise(ctx.workers, first.xyz, *args)
        kept = t2.nbl is t1.nbl and t2.nbl.n_builds == builds
        distributed.release_kept_list()
        fresh, t3 = distributed_minimise(ctx.workers, first.xyz, *args)
        assert t3.nbl is not t1.nbl
        same[:] = [kept, np.array_equal(second.xyz, fresh.xyz) and second.f == fresh.f]
        distributed.release_kept_list()
    WORLD.Allreduce(MPI.IN_PLACE, same, op=MPI.MIN)
    assert same[0] == 1.0 and same[1] == 1.0


def test_statistics_equal_the_engine(ctx, case):
    keys = ("bond_rmsd", "bond_rmsz", "bond_max_dev", "angle_rmsd", "angle_rmsz", "angle_max_dev",
            "torsion_rmsd", "chiral_rmsd", "chiral_inversions", "planarity_rmsd", "clashes")
    worst = np.zeros(len(keys))
    if ctx.is_worker:
        xyz0 = case["xyz0"]
        target = distributed_target(ctx.workers, xyz0, case["term"], case["r"],
                                    case["model"].res_first_atom, WEIGHT, case["params"])
        got = target.statistics(xyz0)
        want = _engine_fun(case)[1].statistics(xyz0)
        assert want["clashes"] > 0
        worst = [abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) for k in keys]
    worst = _world_max(worst)
    assert np.all(worst < 1e-9), dict(zip(keys, worst))


def test_minimisation_agrees_with_a_single_process(ctx, case, measured):
    """40 L-BFGS iterations shared by the workers end where the single-process engine ends."""
    xyz0, params = case["xyz0"], case["params"]
    n = len(xyz0)
    mine = np.zeros((n, 3))
    timing = np.zeros(3)
    if ctx.is_worker:
        res, target = distributed_minimise(ctx.workers, xyz0, case["term"], case["r"],
                                           case["model"].res_first_atom, WEIGHT, ITERATIONS, params)
        assert res.iterations == ITERATIONS
        mine = res.xyz
        timing = np.array([res.seconds / res.evaluations, target.seconds_local / target.n_evals,
                           target.seconds_reduce / target.n_evals])
    if ctx.is_master:
        ref = minimise(xyz0, case["term"], GeometryTerm(case["r"], params), WEIGHT, ITERATIONS, params)
        if not ctx.is_worker:
            mine = ref.xyz
    # the master sleeps until the workers are done, then gathers every rank's coordinates
    if ctx.is_master:
        master_wait_for(WORLD)
    else:
        notify_master(WORLD)
    size = WORLD.Get_size()
    every = np.empty((size, n, 3)) if ctx.is_master else None
    WORLD.Gather(np.ascontiguousarray(mine), every, root=0)
    times = np.empty((size, 3)) if ctx.is_master else None
    WORLD.Gather(timing, times, root=0)
    summary = np.zeros(4)
    if ctx.is_master:
        distributed = every[1:] if size > 1 else every
        summary[0] = np.max(np.abs(distributed - ref.xyz[None]))
        summary[1] = np.max(np.abs(distributed - distributed[0][None]))       # workers agree
        truth = case["model"].xyz
        summary[2] = np.sqrt(np.mean(np.sum((xyz0 - truth) ** 2, axis=1)))
        summary[3] = np.sqrt(np.mean(np.sum((distributed[0] - truth) ** 2, axis=1)))
        worker_times = times[1:] if size > 1 else times
        measured["max coordinate difference distributed vs single process (A)"] = f"{summary[0]:.3g}"
        measured["rmsd to the true model before / after (A)"] = f"{summary[2]:.3f} / {summary[3]:.3f}"
        measured["seconds per evaluation (L-BFGS total, local terms, Allreduce), slowest worker"] = \
            " ".join(f"{t * 1e3:.2f} ms" for t in worker_times.max(axis=0))
    WORLD.Bcast(summary, root=0)
    assert summary[0] < 1e-4
    assert summary[1] == 0.0
    assert summary[3] < summary[2] - 0.2          # the refinement did refine


def _chain_energy(x):
    """A non-quadratic objective whose terms couple neighbouring components (across any split)."""
    d = x - np.cos(np.arange(len(x)) * 0.37) * 2.0
    c = np.diff(x)
    f = np.sum(np.sin(d) * d + 0.1 * d ** 4) + 0.5 * np.sum(c ** 2)
    g = np.cos(d) * d + np.sin(d) + 0.4 * d ** 3
    g[:-1] -= c
    g[1:] += c
    return float(f), g


def test_split_lbfgs_keeps_a_part_and_agrees_with_the_whole(ctx):
    """core.lbfgs with comm: each worker holds only its part of the vector and of the history,
    and the iterates agree with L-BFGS on the whole vector (to summation order)."""
    n_points = 301
    x0 = np.sin(np.arange(3 * n_points) * 1.3)
    ref, f_ref, ref_state, _ = lbfgs(_chain_energy, x0, maxiter=30, m=5, max_step=0.3)
    assert ref_state.iteration > 10
    summary = np.zeros(2)
    if ctx.is_worker:
        comm = ctx.workers
        k, p = comm.Get_size(), comm.Get_rank()
        counts = np.array([3 * (n_points * (q + 1) // k - n_points * q // k) for q in range(k)])
        starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
        whole = np.empty(3 * n_points)

        def fun(part):
            comm.Allgatherv([np.ascontiguousarray(part), MPI.DOUBLE], [whole, (counts, starts), MPI.DOUBLE])
            f, g = _chain_energy(whole)
            return f, g[starts[p]:starts[p] + counts[p]]
        part, f, state, _ = lbfgs(fun, x0[starts[p]:starts[p] + counts[p]], maxiter=30, m=5,
                                  max_step=0.3, comm=comm)
        assert state.S.shape == (5, counts[p]) and state.iteration == ref_state.iteration
        comm.Allgatherv([part, MPI.DOUBLE], [whole, (counts, starts), MPI.DOUBLE])
        summary[:] = np.max(np.abs(whole - ref)), abs(f - f_ref)
    WORLD.Allreduce(MPI.IN_PLACE, summary, op=MPI.MAX)
    assert summary[0] < 1e-8 and summary[1] < 1e-8


def test_master_sleeps_while_it_waits_for_the_workers(ctx, measured):
    """With workers, the master's CPU time over a 3 s wait is < 0.3 s; alone it does not wait."""
    cpu = wall = 0.0
    if ctx.is_master:
        c0 = time.process_time()
        wall = master_wait_for(WORLD)
        cpu = time.process_time() - c0
    else:
        time.sleep(3.0)
        notify_master(WORLD)
    cpu, wall = _world_max([cpu, wall])
    if WORLD.Get_size() >= 2:
        measured["master CPU seconds during a wait of"] = f"{wall:.2f} s: {cpu:.4f} s"
        assert wall >= 2.9
        assert cpu < 0.3
    else:
        assert wall < 0.1


def test_wait_quietly_sleeps_until_the_request_completes():
    """Every rank: a receive completed 1 s later by another thread costs well under 0.1 s CPU."""
    assert MPI.Query_thread() == MPI.THREAD_MULTIPLE
    self_comm = MPI.COMM_SELF
    got = np.zeros(1)
    req = self_comm.Irecv(got, source=0, tag=11)
    sender = threading.Timer(1.0, lambda: self_comm.Send(np.array([42.0]), dest=0, tag=11))
    c0, t0 = time.process_time(), time.perf_counter()
    sender.start()
    wait_quietly(self_comm, req)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    sender.join()
    assert got[0] == 42.0
    assert wall >= 0.95
    cpu, = _world_max([cpu])
    assert cpu < 0.1


def test_wait_quietly_times_out():
    req = MPI.COMM_SELF.Irecv(np.zeros(1), source=0, tag=12)
    with pytest.raises(TimeoutError):
        wait_quietly(MPI.COMM_SELF, req, timeout=0.1)
    MPI.COMM_SELF.Send(np.zeros(1), dest=0, tag=12)      # complete it: nothing left pending
    req.Wait()


def test_a_model_read_once_reaches_the_others_with_or_without_its_structure(case):
    """read_model over the world: rank 0 parses the file and the others receive the same arrays;
    with structure_everywhere=False they receive no gemmi Structure (refine: the workers read it
    only to search for NCS), while rank 0 keeps its own."""
    path = datasets.fetch(["adk_closed"])["adk_closed"]
    ok = []
    for everywhere in (True, False):
        m = read_model(path, WORLD, structure_everywhere=everywhere)
        has = m.st is not None
        ok.append(has == (everywhere or WORLD.Get_rank() == 0))
        ok.append(np.array_equal(m.xyz, case["model"].xyz) and np.array_equal(m.occ, case["model"].occ)
                  and list(m.atom_name) == list(case["model"].atom_name))
    assert all(WORLD.allgather(all(ok)))
