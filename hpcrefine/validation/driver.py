"""The `hpcrefine validate` driver: check every input, validate, write the report.

All inputs are read and checked (model, maps on one grid, model inside the map, resolution,
restraint dictionaries, output directory) before anything is written; a problem is one
InputError. Results already in the output directory are kept unless overwrite is set.
"""
from __future__ import annotations

import logging
import os

from ..errors import InputError
from ..log import run_header
from ..modelio import atomic_write_text
from .report import format_summary, validate_model, write_outputs

log = logging.getLogger(__name__)

OUTPUT_NAMES = ("validation.json", "validation_residues.csv", "validation_ramachandran.png",
                "validation_fsc.png", "validation_residue_cc.png", "validation.log")


def check_output_dir(outdir: str, overwrite: bool) -> None:
    if os.path.exists(outdir) and not os.path.isdir(outdir):
        raise InputError(f"output path {outdir} exists and is not a directory")
    if os.path.isdir(outdir) and not overwrite:
        present = [n for n in OUTPUT_NAMES if os.path.exists(os.path.join(outdir, n))]
        if present:
            raise InputError(f"output directory {outdir} already holds validation results "
                             f"({', '.join(present)}); choose another --output or pass --overwrite")
    parent = os.path.dirname(os.path.abspath(outdir))
    if not os.access(parent, os.W_OK):
        raise InputError(f"cannot create output directory {outdir}: {parent} is not writable")


def load(model_path: str, map_path, half_maps, monlib, ligands):
    """Read and check the model, maps and restraints: (model, restraints, map or None, halves or None)."""
    from ..mapio import check_model_inside, check_same_grid, read_map
    from ..modelio import read_model
    from ..topology import library_restraints

    model = read_model(model_path)
    grid = read_map(map_path) if map_path else None
    halves = None
    if half_maps:
        halves = (read_map(half_maps[0]), read_map(half_maps[1]))
        check_same_grid(*halves)
        if grid is not None:
            check_same_grid(grid, halves[0])
    for g in ([grid] if grid is not None else []) + (list(halves) if halves else [])[:1]:
        check_model_inside(model.xyz, g)
    return model, library_restraints(model, monlib, ligands)[1], grid, halves


def run_validate(model_path: str, outdir: str, resolution: float | None, map_path: str | None = None,
                 half_maps=None, monlib: str | None = None, ligands=(), overwrite: bool = False,
                 command: str = "hpcrefine validate") -> dict:
    """Validate a model file (optionally against a map or half maps) and write the report."""
    check_output_dir(outdir, overwrite)
    if (map_path or half_maps) and resolution is None:
        raise InputError("validating against a map needs its resolution: give --resolution D")
    model, restraints, grid, halves = load(model_path, map_path, half_maps, monlib, ligands)
    result = validate_model(model, model.xyz, restraints, map_grid=grid, data=None,
                            half_maps=halves, resolution=resolution)
    result["inputs"] = {"model": os.path.abspath(model_path),
                        "map": os.path.abspath(map_path) if map_path else None,
                        "half_maps": [os.path.abspath(h) for h in half_maps] if half_maps else None}
    lines = run_header(command) + format_summary(result)
    for line in lines[3:]:
        log.info("%s", line)
    paths = write_outputs(result, outdir)
    atomic_write_text(os.path.join(outdir, "validation.log"), "\n".join(lines) + "\n")
    log.info("wrote %s", ", ".join(os.path.basename(p) for p in paths + ["validation.log"]))
    return result
