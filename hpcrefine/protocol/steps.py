"""The protocol steps of a refinement run and the order they run in.

params.protocol lists the steps, e.g. "rigid,morph,minimise,adp":
  rigid     rigid-body refinement of groups (rigid.py) against the map blurred in rounds
  morph     smooth local shifts at control points (morph.py) against the heavily blurred map,
            in rounds of decreasing blur and radius
  minimise  the macro-cycles of restrained coordinate minimisation (refine._refine_stages)
  adp       B-factors against the map at the final coordinates (adp.py)
  occupancy occupancies of alternative conformations against the map at the final coordinates
            (occupancy.py), a softmax per residue keeping each residue's sum
  anneal    simulated annealing: MD on the refinement target, cooled (anneal.py); before minimise
  idealise  the restraints without the map, atoms tethered to the start (idealise.py)
  rotamer   side chains set to the library rotamer the map fits best (rotamer_fit.py);
            before minimise, after it, or both ("rotamer,minimise,rotamer")
Steps before "minimise" prepare the start model (the "prepare" stage of a run); "adp" and
"occupancy" run at the final coordinates, after it. Each step here is run collectively by every
rank of the run through a ParamRunner and returns the same result on every rank.

The rigid and morph steps fit the blurred map with the data term alone (coordinate_term, by
default BlurredFit), without restraints: the restraint gradient of a start with poor geometry
would drive the parameters to relieve it instead of fitting the map, and the macro-cycles that
follow restore the geometry with every restraint.
"""
from __future__ import annotations

import logging

import numpy as np

from ..errors import InputError
from .param import ParamRunner, coordinate_objective, param_objective

log = logging.getLogger(__name__)

STEPS = ("rigid", "morph", "anneal", "idealise", "rotamer", "minimise", "adp", "occupancy")
FINAL_ONLY = ("adp", "occupancy")       # steps at the final coordinates: after minimise


def parse_protocol(value) -> list[str]:
    """The steps of a protocol given as "a,b,c" or a list; InputError for unknown or misplaced steps."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace("+", ",").split(",")
    steps = [str(s).strip().lower() for s in items if str(s).strip()]
    steps = ["minimise" if s == "minimize" else s for s in steps]
    steps = ["idealise" if s == "idealize" else s for s in steps]
    if not steps:
        raise InputError("the protocol names no step; choose from " + ", ".join(STEPS))
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise InputError(f"unknown protocol step(s) {', '.join(bad)}; choose from {', '.join(STEPS)}")
    if steps.count("minimise") > 1:
        raise InputError("the protocol names minimise more than once (it is the macro-cycles)")
    if "adp" in steps and ("minimise" in steps and steps.index("adp") < steps.index("minimise")):
        raise InputError("adp refines B at the final coordinates: put it after minimise")
    if "occupancy" in steps and ("minimise" in steps and steps.index("occupancy") < steps.index("minimise")):
        raise InputError("occupancy refines occupancies at the final coordinates: put it after minimise")
    if "minimise" in steps and "anneal" in steps[steps.index("minimise"):]:
        raise InputError("anneal leaves the model at its end temperature: put minimise after it")
    return steps


def split_protocol(value) -> tuple[list[str], bool, list[str]]:
    """(steps before the macro-cycles, whether they run, steps after them)."""
    steps = parse_protocol(value)
    if "minimise" in steps:
        i = steps.index("minimise")
        return steps[:i], True, steps[i + 1:]
    pre = [s for s in steps if s not in FINAL_ONLY]
    return pre, False, [s for s in steps if s in FINAL_ONLY]


class BlurredFit:
    """The data term of the coordinate steps: the density fit (core.modelmap.DensityFitTerm) of
    the map blurred by b and a model map of atoms blurred by the same b, over the whole box.

    Unlike the fast target (map values at atom centres), whose optimum on a heavily blurred map
    pulls atoms together into the blurred peak, a least-squares fit of like to like is stationary
    at the true model, so blurring widens the basin of attraction without biasing it (a morph
    round at blur 300 A^2 moved a placed, shaken adk by 0.14 A rms with this term alone, 4.4 A
    with the fast target and the restraints)."""

    def __init__(self, data, origin, voxel, elements, b, b_blur: float, occ=None):
        self.data = np.asarray(data, dtype=np.float32)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.voxel = np.asarray(voxel, dtype=np.float64)
        self.elements = elements
        self.b = np.asarray(b, dtype=np.float64)
        self.b_blur = float(b_blur)
        self.occ = occ

    def blurred(self, blur: float):
        from ..core.density import blur_map, normalise_map
        from ..core.modelmap import DensityFitTerm

        data = blur_map(self.data, self.voxel, blur) if blur > 0 else self.data
        return DensityFitTerm(normalise_map(data), self.origin, self.voxel, np.ones(data.shape),
                              self.elements, self.b, self.b_blur + blur, occ=self.occ)


def coordinate_term(inputs, params):
    """The data term of the rigid and morph steps (params.prepare_target): "fit" (BlurredFit) or
    "fast" (engine.RealSpaceTerm, blurred by blurring the map)."""
    model, grid = inputs.model, inputs.map
    if params.prepare_target == "fast":
        from ..engine import RealSpaceTerm
        return RealSpaceTerm(inputs.data, grid.origin, grid.voxel, np.ones(model.n_atoms))
    return BlurredFit(inputs.data, grid.origin, grid.voxel, model.element, model.b, params.fit_b_blur,
                      occ=model.occ)


def _blurred(term, blur):
    return term.blurred(blur) if blur > 0 or isinstance(term, BlurredFit) else term


def _weight(xyz, term, geom):
    """The data term's scale: without restraints in these steps it only sets the size of the
    gradient (about 50 per atom rms, engine.initial_weight), against which the morph penalty and
    the optimiser's gradient tolerance are measured."""
    from ..engine import initial_weight
    return initial_weight(xyz, term, geom)


def rigid_step(runner: ParamRunner, model, xyz, data_term, geom, params, res_first_atom):
    """Rigid-body refinement of params.rigid_groups (default: each chain) in rounds of
    decreasing map blur (params.rigid_blurs), data term alone. Returns (xyz, record)."""
    from .rigid import RigidBodies, parse_groups

    groups = parse_groups(params.rigid_groups, model)
    record = {"step": "rigid", "groups": len(groups), "rounds": []}
    for blur in params.rigid_blurs:
        term = _blurred(data_term, blur)
        w = _weight(xyz, term, geom)
        bodies = RigidBodies(xyz, groups)

        def build(comm, bodies=bodies, term=term, w=w, xyz=xyz):
            return param_objective(bodies, coordinate_objective(comm, xyz, term, None, res_first_atom,
                                                                w, params))
        res = runner.minimise(build, bodies.zero(), params.rigid_iterations, params.lbfgs_memory,
                              max_step=params.max_step * 2, point_dim=3)
        xyz = bodies.coords(res.p)
        moves = bodies.describe(res.p)
        record["rounds"].append({"map_blur": blur, "weight": round(w, 4), "iterations": res.iterations,
                                 "seconds": round(res.seconds, 2), "target": round(float(res.f), 4),
                                 "max_shift": max(m["shift"] for m in moves),
                                 "max_rotation_deg": max(m["rotation_deg"] for m in moves)})
        log.info("rigid body (%d groups, map blur %.0f A^2): %d iterations, largest shift %.2f A, "
                 "largest rotation %.2f deg", len(groups), blur, res.iterations,
                 record["rounds"][-1]["max_shift"], record["rounds"][-1]["max_rotation_deg"])
    return xyz, record


def morph_step(runner: ParamRunner, model, xyz, data_term, geom, params, res_first_atom):
    """Morphing in rounds (params.morph_blurs, params.morph_radii) from xyz, data term plus the
    smoothness penalty. Returns (xyz, record)."""
    from .morph import Morph, control_atoms

    ctrl = control_atoms(model, params.morph_every)
    record = {"step": "morph", "control_points": len(ctrl), "rounds": []}
    for blur, radius in zip(params.morph_blurs, params.morph_radii):
        term = _blurred(data_term, blur)
        w = _weight(xyz, term, geom)
        morph = Morph(xyz, xyz[ctrl], radius)
        # the penalty on the scale of the data term: lambda per unit of weight and atoms per point
        lam = params.morph_smooth * w * model.n_atoms / len(ctrl) / radius ** 2
        penalty = morph.smoothness(lam)

        def build(comm, morph=morph, term=term, w=w, xyz=xyz, penalty=penalty):
            return param_objective(morph, coordinate_objective(comm, xyz, term, None, res_first_atom,
                                                               w, params), penalty)
        res = runner.minimise(build, morph.zero(), params.morph_iterations, params.lbfgs_memory,
                              max_step=params.max_step, point_dim=3)
        new = morph.coords(res.p)
        shift = float(np.sqrt(np.mean(np.sum((new - xyz) ** 2, axis=1))))
        xyz = new
        record["rounds"].append({"map_blur": blur, "radius": radius, "weight": round(w, 4),
                                 "iterations": res.iterations, "seconds": round(res.seconds, 2),
                                 "target": round(float(res.f), 4), "rms_shift": round(shift, 3)})
        log.info("morph (%d control points, radius %.1f A, map blur %.0f A^2): %d iterations, "
                 "rms shift %.2f A", len(ctrl), radius, blur, res.iterations, shift)
    return xyz, record


def adp_step(runner: ParamRunner, model, xyz, b_start, inputs, restraints, params, res_first_atom,
             occ=None):
    """B-factors at fixed coordinates (and occupancies, default the model's) against the map
    (adp.py). Returns (b, record)."""
    from ..core.density import normalise_map
    from ..mapstats import atom_mask
    from .adp import ADPDataTerm, ADPRestraints, GroupedB, IndividualB, adp_objective

    param = GroupedB(model.res_index, model.n_residues) if params.adp_mode == "group" else IndividualB()

    def build(comm):
        # only the ranks that evaluate build the term (the master of a parallel run waits)
        grid = inputs.map
        mask = atom_mask(xyz, inputs.data.shape, grid.origin, grid.voxel, params.fit_mask_radius)
        data = ADPDataTerm(normalise_map(inputs.data), grid.origin, grid.voxel, mask, xyz,
                           model.element, params.fit_b_blur, occ=model.occ if occ is None else occ)
        rest = ADPRestraints(restraints.bond_idx, b_start, params.adp_similarity_sigma,
                             params.adp_prior_sigma)
        return adp_objective(comm, data, rest, param, params.adp_weight, res_first_atom)
    res = runner.minimise(build, param.start(b_start), params.adp_iterations, params.lbfgs_memory,
                          max_step=params.adp_max_step, point_dim=1)
    b = np.clip(param.expand(res.p), params.adp_b_min, params.adp_b_max)
    record = {"step": "adp", "mode": params.adp_mode, "iterations": res.iterations,
              "seconds": round(res.seconds, 2), "target": round(float(res.f), 4),
              "b_mean": round(float(b.mean()), 2),
              "b_min": round(float(b.min()), 2), "b_max": round(float(b.max()), 2)}
    log.info("ADP (%s B): %d iterations (%.1f s), B mean %.1f, range %.1f-%.1f A^2", params.adp_mode,
             res.iterations, res.seconds, record["b_mean"], record["b_min"], record["b_max"])
    return b, record


def run_steps(names, runner: ParamRunner, inputs, xyz, b, data_term, geom, params, on_step=None,
              occ=None):
    """Run the named steps in order from (xyz, b, occ: default the model's occupancies);
    on_step(name, xyz, record) after each. Returns (xyz, b, occ, records)."""
    model = inputs.model
    first = model.res_first_atom
    occ = model.occ if occ is None else occ
    records = []
    for name in names:
        if name == "rigid":
            xyz, rec = rigid_step(runner, model, xyz, data_term, geom, params, first)
        elif name == "morph":
            xyz, rec = morph_step(runner, model, xyz, data_term, geom, params, first)
        elif name == "adp":
            b, rec = adp_step(runner, model, xyz, b, inputs, inputs.restraints, params, first, occ)
        elif name == "occupancy":
            from .occupancy import occupancy_step
            occ, rec = occupancy_step(runner, model, xyz, b, occ, inputs, params)
        elif name == "anneal":
            from .anneal import anneal_step
            xyz, rec = anneal_step(runner, model, xyz, inputs, geom, params, first)
        elif name == "idealise":
            from .idealise import idealise_step
            xyz, rec = idealise_step(runner, model, xyz, geom, params, first)
        elif name == "rotamer":
            from .rotamer_fit import rotamer_step
            xyz, rec = rotamer_step(runner, inputs, xyz, params)
        else:
            raise ValueError(f"{name} is not a step run here")
        records.append(rec)
        if on_step is not None:
            on_step(name, xyz, rec)
    return xyz, b, occ, records
