"""Runs protocol steps (hpcrefine.protocol.steps.run_steps) collectively under mpiexec, for the
tests that compare 1 process, 1 worker and 2 workers (test_protocol, test_anneal,
test_rotamer_fit, test_occupancy):

    mpiexec -n K python tests/run_steps_mpi.py MODEL MAP OUT.npz STEPS PARAMS_JSON [coordinate-term]

STEPS: comma-separated step names; PARAMS_JSON: RefineParams fields replacing those of
build_params(resolution) (the "resolution" key, default 3.5, picks them); "coordinate-term": pass
the rigid/morph steps' data term (steps.coordinate_term). Rank 0 writes OUT.npz (xyz, b, occ) and
prints "ranks K records JSON"; every other rank writes OUT.rankR.npz, so that a test can check
that every rank holds the same answer.
"""
import dataclasses
import json
import sys
import types

import numpy as np
from mpi4py import MPI

from hpcrefine.engine import GeometryTerm
from hpcrefine.mapio import read_map
from hpcrefine.modelio import read_model
from hpcrefine.monlib import MonomerLibrary
from hpcrefine.params import build_params
from hpcrefine.parallel.context import make_context
from hpcrefine.parallel.distributed import install_abort_on_error
from hpcrefine.protocol.param import ParamRunner
from hpcrefine.protocol.steps import coordinate_term, run_steps
from hpcrefine.topology import build_restraints


def main(argv):
    model_path, map_path, out, steps, fields = argv[:5]
    fields = json.loads(fields)
    world = MPI.COMM_WORLD
    install_abort_on_error(world)
    ctx = make_context(world)
    model = read_model(model_path)
    grid = read_map(map_path)
    r = build_restraints(model, MonomerLibrary())
    params = dataclasses.replace(build_params(float(fields.pop("resolution", 3.5))), **fields)
    inputs = types.SimpleNamespace(model=model, map=grid, data=np.asarray(grid.data, dtype=np.float32),
                                   restraints=r)
    term = coordinate_term(inputs, params) if "coordinate-term" in argv[5:] else None
    xyz, b, occ, records = run_steps(steps.split(","), ParamRunner(ctx), inputs, model.xyz, model.b, term,
                                GeometryTerm(r, params), params)
    rank = world.Get_rank()
    np.savez(out if rank == 0 else f"{out}.rank{rank}.npz", xyz=xyz, b=b, occ=occ)
    if rank == 0:
        print("ranks", world.Get_size(), "records", json.dumps(records))


if __name__ == "__main__":
    main(sys.argv[1:])
