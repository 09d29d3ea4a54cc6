"""Model validation: geometry, Ramachandran, rotamers, C-beta, clashes and map-model fit.

The figures a structural biologist checks before deposition, computed on hpcrefine's flat
arrays at any model size, with no MPI:

    from hpcrefine.validation import validate_model, format_summary, write_outputs
    result = validate_model(model, xyz, restraints, map_grid, data, half_maps, resolution)
    for line in format_summary(result): log.info(line)
    write_outputs(result, outdir)          # validation.json, validation_residues.csv, PNG plots

One module per metric (geometry, ramachandran, rotamer, cbeta, clash, mapfit), the shared
per-residue atom tables (residues), the report (report), plots (plots) and the `validate`
command's driver (driver).
"""
from .report import format_summary, json_ready, validate_model, write_outputs

__all__ = ["validate_model", "format_summary", "json_ready", "write_outputs"]
