"""One typed parameter schema for refinement, with the resolution-dependent defaults in one place.

Parameters come from (lowest to highest priority): the defaults below, resolution-dependent
defaults (`resolution_defaults`), a TOML parameter file (`--params FILE`), and command-line options.
The resolved set is written at the top of the log and into report.json.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass

from .errors import InputError


@dataclass
class RefineParams:
    resolution: float = 0.0
    # macro-cycles of (weight check, coordinate minimisation)
    macro_cycles: int = 3
    iterations: int = 150             # L-BFGS iterations per macro-cycle
    lbfgs_memory: int = 10
    max_step: float = 0.5              # A, largest displacement of any atom in one line-search trial
    # data/restraint weight: None = automatic
    weight: float | None = None
    # with half maps and no fixed weight: "halfset" = the final refinement runs at the weight the
    # half sets' free residual picks (halfset.FULL_MAP_WEIGHT_FACTOR x it); "geometry" = every
    # macro-cycle picks the largest weight within the geometry limits below
    weight_by: str = "halfset"
    bond_rmsd_max: float = 0.012
    angle_rmsd_max: float = 1.5        # degrees
    weight_trial_iterations: int = 60
    # data term: "fast" (map values at atom centres) or "fit" (Gaussian-atom model map fitted to
    # the map voxel by voxel: unbiased at low resolution, several times slower)
    target: str = "fast"
    map_blur_start: float = 0.0        # A^2 extra B for the first macro-cycle (radius of convergence)
    fit_b_blur: float = 15.0           # A^2 added to every atom's B in the "fit" model map
    fit_blur_start: float = 105.0      # A^2 extra B of the "fit" model map in the first macro-cycle
    fit_mask_radius: float = 3.5       # A around the start model's atoms
    # non-bonded repulsion
    nonbonded_sigma: float = 0.2
    nonbonded_weight: float = 1.0
    # restraint term weights
    idealize_anchor_sigma: float = 0.5  # A, pull towards the start in `idealize`
    seed: int = 0
    # half-set validation: each half starts from the model displaced by this rms (A), independently,
    # so the two half-set models do not share the start's errors (Spearman of the per-residue error
    # estimate against the real error on adk: 0.27 without, 0.32 with 0.3 A)
    halfset_start_shake: float = 0.3
    # checkpoints (OUTPUT/checkpoint.h5) at step boundaries: when this many seconds have passed
    # since the last one, or every checkpoint_steps steps (0: by time only); a signal always
    # checkpoints. These two may change in a restart.
    checkpoint_seconds: float = 120.0
    checkpoint_steps: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolution_defaults(resolution: float) -> dict:
    """Defaults that depend on resolution, all written here.

    Lower resolution: more blur in the first macro-cycle (a wider basin of attraction) and a
    tighter geometry target, since the map constrains the model less.
    """
    if resolution <= 3.0:
        return {"map_blur_start": 0.0, "macro_cycles": 3}
    if resolution <= 4.5:
        return {"map_blur_start": 40.0, "macro_cycles": 4}
    return {"map_blur_start": 80.0, "macro_cycles": 4, "angle_rmsd_max": 1.3}


def positive_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise InputError(f"{what} must be a positive number, got {text!r}")
    return v


def build_params(resolution: float, param_file: str | None = None, overrides: dict | None = None) -> RefineParams:
    """Resolve parameters: defaults < resolution defaults < TOML file < command line."""
    values: dict = {"resolution": resolution}
    values.update(resolution_defaults(resolution))
    if (overrides or {}).get("target") not in (None, "fast", "fit"):
        raise InputError(f"--target must be fast or fit, got {overrides['target']!r}")
    if (overrides or {}).get("weight_by") not in (None, "halfset", "geometry"):
        raise InputError(f"--weight-by must be halfset or geometry, got {overrides['weight_by']!r}")
    names = {f.name for f in dataclasses.fields(RefineParams)}
    if param_file:
        try:
            with open(param_file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise InputError(f"parameter file not found: {param_file}") from None
        except tomllib.TOMLDecodeError as exc:
            raise InputError(f"parameter file {param_file} is not valid TOML: {exc}") from None
        data = data.get("refine", data)
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown parameter(s) in {param_file}: {', '.join(unknown)}; "
                             f"known: {', '.join(sorted(names))}")
        values.update(data)
    for k, v in (overrides or {}).items():
        if v is not None:
            values[k] = v
    return RefineParams(**values)
