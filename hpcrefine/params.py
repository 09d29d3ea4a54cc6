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
    # how the workers of a coordinate minimisation share the atoms: "boxes" (compact regions of
    # whole residues, each worker exchanging only its halo), "blocks" (runs of residues in file
    # order, the whole model gathered at every evaluation), or "auto": boxes when
    # atoms x (workers - 1)^2 >= parallel.distributed.BOXES_FROM (measured in the README, Scale)
    decomposition: str = "auto"
    # data/restraint weight: None = automatic
    weight: float | None = None
    # with half maps and no fixed weight: "halfset" = the final refinement runs at the weight the
    # half sets' free residual picks (halfset.FULL_MAP_WEIGHT_FACTOR x it); "geometry" = every
    # macro-cycle picks the largest weight within the geometry limits below
    weight_by: str = "halfset"
    bond_rmsd_max: float = 0.012
    angle_rmsd_max: float = 1.5        # degrees
    weight_trial_iterations: int = 60  # at most `iterations` (engine.trial_iterations)
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
    idealize_anchor_sigma: float = 0.5  # A, pull towards the start in `idealize` and the idealise step
    seed: int = 0
    # half-set validation: each half starts from the model displaced by this rms (A), independently,
    # so the two half-set models do not share the start's errors (Spearman of the per-residue error
    # estimate against the real error on adk: 0.27 without, 0.32 with 0.3 A)
    halfset_start_shake: float = 0.3
    # inverted chiral centres put back (core.geometry.correct_inversions: each centre reflected
    # through the plane of its three neighbours) at the start of every macro-cycle of the final
    # refinement and of every half-set task. 6zu5 shaken by 0.8 A: 5,294 centres inverted at the
    # start, 67 left after 2 x 30 iterations without it (62 of them inverted from the start)
    fix_chirality: bool = True
    # how the workers share the half-set tasks (half, weight): "parallel" = the two half sets at
    # once on the odd and the even workers, each half's workers split into up to one group per
    # weight (fastest while there are no more workers than tasks; a group of one worker holds a
    # whole task: the whole model's optimiser history, neighbour list and map pages); "shared" =
    # every task refined by all the workers together, one after another (each worker holds its
    # boxes' share of a task, so a worker's memory falls with the workers; slower by the exchanges);
    # "auto" = parallel while a worker's estimated peak fits in its share of its node's memory,
    # else shared with whole_model_on_workers false (parallel.budget; logged, and kept by a
    # continued run)
    halfset_layout: str = "auto"
    # the memory a worker may use, GB, for halfset_layout "auto"; 0 = measured on each node at the
    # start (MemAvailable, or the cgroup's limit under SLURM, less the master's estimate, divided
    # among the node's workers). May change in a restart.
    worker_memory_gb: float = 0.0
    # whole-model figures made by spare workers while the master does other work: the start
    # model's statistics (the last worker, while the master prepares the half-set maps), its
    # validation (worker 1) and the final statistics (the last worker), each over the whole model
    # (at a million atoms those workers peak at 2.8-3.8 GB instead of their share). false: the
    # master makes them all (it holds the whole model anyway; longer wall time), so a worker
    # holds only its share of the refinement and its memory falls with the workers; with the
    # "shared" layout and two workers or more, a worker also keeps only its part of the
    # restraints, cut from the start model once (refine.workers_hold_parts: not with NCS,
    # protocol steps or rotamer steps between the macro-cycles)
    whole_model_on_workers: bool = True
    # checkpoints (OUTPUT/checkpoint.h5) at step boundaries: when this many seconds have passed
    # since the last one, or every checkpoint_steps steps (0: by time only); a signal always
    # checkpoints. These two may change in a restart.
    checkpoint_seconds: float = 120.0
    checkpoint_steps: int = 0
    # NCS (hpcrefine.ncs): "constraints" (one master copy and a rigid operator per copy refined),
    # "restraints" (copies pulled to their superposed average, sigma ncs_sigma A), "off", or
    # "auto" (constraints when the copies agree within 0.5 A rmsd, restraints within 1.0 A)
    ncs: str = "auto"
    ncs_sigma: float = 0.25
    # with fixed operators (an asymmetric unit constrained by its file's assembly operators) the
    # fast target of all copies is taken from the map summed over the operators into the
    # master's frame (ncs.AveragedMap): one copy's work per evaluation instead of every copy's
    ncs_average_map: bool = True
    # under --ncs constraints the half-set tasks hold each copy's operator at its superposition on
    # the half set's start and refine the masters (and free atoms) alone, so with one NCS group
    # the summed map above serves them too; the final refinement refines the operators
    halfset_fixed_operators: bool = True
    # under --ncs constraints, operators found by superposition that form a group to within
    # ncs_group_tolerance A (the largest rms shift of a copy's atoms: the 60 of an icosahedral
    # assembly given as a whole) are made that exact group and fixed: every copy is then the
    # master's image and the target is evaluated from the master alone (ncs.SymmetricTarget)
    ncs_exact_group: bool = True
    ncs_group_tolerance: float = 0.5
    # low-resolution restraints (hpcrefine.lowres); on/off defaults in resolution_defaults
    ss_restraints: bool = False        # helix and strand H-bonds found in the start model
    ss_helix_310_pi: bool = False      # also 3-10 (i -> i+3) and pi (i -> i+5) helices
    ss_detect_cutoff: float = 4.0      # A, O..N of a candidate H-bond in the start model
    hbond_target: float = 3.0          # A, O..N; zero within target +- flat
    hbond_flat: float = 0.15
    hbond_sigma: float = 0.1
    hbond_limit: float = 1.0           # A beyond the flat bottom where the pull tops out
    rama_restraints: bool = False
    rama_weight: float = 3.0          # 1: 3.3%, 3: 0.47% outliers on adk at 6 A (bench_lowres.py)
    reference_model: str | None = None  # --reference: torsions restrained to this model's
    reference_sigma: float = 5.0       # degrees
    reference_limit: float = 30.0      # degrees: the pull tops out beyond this deviation
    rotamer_restraints: bool = False   # chi angles towards the nearest library rotamer (of the start, or of the model a rotamer step left)
    # protocol steps (hpcrefine.protocol.steps): "rigid", "morph", "minimise" (the macro-cycles),
    # "adp", comma-separated or a TOML list, in order; steps before minimise prepare the start
    protocol: str = "minimise"
    rigid_groups: str = ""             # "A:1-29,A:60-121|A:30-59" or a file; empty: each chain;
                                       # "auto": domains found in the start (protocol.domains)
    prepare_target: str = "fit"        # data term of rigid and morph: "fit" (blurred model map
                                       # fitted to the blurred map) or "fast" (biased when blurred)
    rigid_blurs: list = dataclasses.field(default_factory=lambda: [400.0, 100.0])  # A^2, a round each
    rigid_iterations: int = 100
    morph_every: int = 2               # control point at the CA of every k-th residue
    morph_blurs: list = dataclasses.field(default_factory=lambda: [300.0, 150.0, 60.0])  # A^2
    morph_radii: list = dataclasses.field(default_factory=lambda: [12.0, 9.0, 6.0])      # A
    morph_smooth: float = 0.03         # smoothness penalty, relative to the data term
    morph_iterations: int = 100
    adp_mode: str = "individual"       # or "group" (one B per residue)
    adp_weight: float = 1.0            # data weight against the B restraints
    adp_similarity_sigma: float = 10.0  # A^2, B of bonded atoms
    adp_prior_sigma: float = 40.0      # A^2, pull towards the start B
    adp_iterations: int = 100
    adp_max_step: float = 20.0         # A^2 per line-search trial
    adp_b_min: float = 1.0
    adp_b_max: float = 500.0
    # occupancies of alternative conformations (protocol step "occupancy",
    # hpcrefine.protocol.occupancy): one per altloc letter of a residue, a softmax per residue
    occupancy_iterations: int = 50     # L-BFGS iterations
    occupancy_max_step: float = 1.0    # softmax logits per line-search trial (1: a 0.5/0.5 pair to 0.27/0.73)
    # simulated annealing (protocol step "anneal", hpcrefine.protocol.anneal): MD on
    # weight * T_data + T_restraints + repulsion. kT is on the target's scale (each restraint
    # term (d/sigma)^2 averages kT/2: kT 2 = rms z 1); time in tau, 1 Da A^2/tau^2 = 1 target unit
    # Defaults measured (scripts/bench_anneal.py, adk, 4 A map, every third side chain turned
    # 120 deg): anneal,minimise all-atom RMSD 0.94-1.00 A over 4 seeds against 1.12 A for minimise
    # alone; hotter (kT 20-100) or at weight x1 it helps less or harms. From a 1.5 A random shake
    # it neither helps nor harms (0.71-0.76 A against 0.72 A); at 3.5 and 6 A the gain on the
    # turned side chains depends on the seed (0.91-1.05 A against 0.97 and 1.02 A).
    anneal_kt_start: float = 5.0
    anneal_kt_end: float = 0.1
    anneal_steps: int = 1000           # MD steps
    anneal_time_step: float = 0.01     # tau (a C-N bond vibrates in 0.23 tau)
    anneal_schedule: str = "linear"    # or "plateaus" (anneal_plateaus equal steps of kT)
    anneal_plateaus: int = 5
    anneal_thermostat: str = "langevin"  # "rescale" (Berendsen), "none" (constant energy)
    anneal_coupling: float = 10.0      # per tau: Langevin friction / inverse rescaling time
    anneal_max_shift: float = 0.1      # A, largest move of any atom in one MD step
    anneal_weight_scale: float = 3.0   # times the automatic data weight (unused with --weight)
    anneal_map_blur: float = 0.0       # A^2 extra B of the map while annealing
    anneal_seed: int = 1               # initial velocities and Langevin noise (same on all workers)
    # model idealisation (protocol step "idealise", hpcrefine.protocol.idealise): the restraints
    # without the map, every atom tethered to its start (idealize_anchor_sigma, as the `idealize`
    # command; 0: the restraints alone, which let the model drift: adk shaken 0.4 A, CA 0.38 A
    # from the truth after, 0.16 A at 0.5)
    idealise_iterations: int = 500
    # rotamer fitting (protocol step "rotamer", hpcrefine.protocol.rotamer_fit): each side chain's
    # library rotamers scored by rho (electron-weighted mean normalised map at the atoms beyond CB,
    # in map sd) - clash_weight * sum(overlap beyond 0.2 A)^2 + prior_weight * log p(chi); the
    # best replaces the current side chain when it scores more than the margin above it
    rotamer_sample_sigma: bool = True  # also each rotamer with one chi at mean +- 1 sigma
    rotamer_map_blur: float = 20.0     # A^2 extra B of the map the side chains are scored in
    rotamer_clash_weight: float = 1.0  # per A^2 of squared overlap
    rotamer_prior_weight: float = 0.02  # per unit of log library density
    rotamer_margin: float = 0.2        # map sd of rho (score units) the best must gain (0.3 worse
                                       # than ROTAMER_MARGIN_FROM: resolution_defaults)
    rotamer_passes: int = 4            # searches against the updated model (stops when none change)
    # the rotamer step also between the macro-cycles of the final refinement (after each but the
    # last, whose minimisation then refines the side chains placed). Measured with
    # scripts/bench_rotamer.py --refine-compare (adk closed shaken 0.5 A, every side chain in a
    # wrong rotamer, default protocol): chi 1 within 40 deg off -> on 12.7 -> 79.4 % at 3 A,
    # 25.5 -> 61.2 % at 4 A, 10.9 -> 46.1 % at 6 A, all-atom RMSD 1.88 -> 0.71, 1.67 -> 0.96,
    # 1.78 -> 1.17 A, rotamer outliers 56 -> 26, 70 -> 60, 47 -> 29; from the true rotamers
    # (shaken) the same at 3 and 4 A, at 6 A chi 1 98.2 -> 96.4 %, RMSD 0.516 -> 0.526 A,
    # outliers 26 -> 18. It costs a rotamer step per cycle (about 5 s on adk, one process).
    # (Numbers searching every side chain; with the selection below see cycle_rotamer_select.)
    # Off by default: it pays only for starts with wrong rotamers, and the adk demo took 6-7 s
    # with it instead of 1.3-1.8 s (README, --cycle-rotamers).
    cycle_rotamers: bool = False
    # which side chains that per-cycle step searches: "all", "outliers_poor_map" (rotamer
    # outliers and side chains whose current rho is below cycle_rotamer_poor_map map sd, as
    # phenix.real_space_refine does) or "outliers" (rotamer outliers alone: on the 6zu5
    # ribosome from a start shaken by 0.8 A, 3,230 side chains searched instead of 6,295, 7.7 s
    # instead of 13-15, rotamer outliers 23.4 % instead of 24.0 %, README Measured results);
    # the protocol step "rotamer" always searches all of them.
    # Same bench, all -> selection: wrong start chi 1 79.4 -> 72.7, 61.2 -> 60.6, 46.1 -> 44.2 %
    # at 3 / 4 / 6 A, RMSD 0.708 -> 0.838, 0.960 -> 1.072, 1.174 -> 1.265 A; true start the
    # same models, its per-cycle steps 6.5 -> 2.8 s (3 A), 9.7 -> 3.9 s (4 A) in all; 7cth
    # (1,679 side chains, 4 A) 48 -> 30 s a step. The threshold: README (--cycle-rotamers).
    cycle_rotamer_select: str = "outliers_poor_map"
    cycle_rotamer_poor_map: float = 1.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def resolution_defaults(resolution: float) -> dict:
    """Defaults that depend on resolution, all written here.

    Lower resolution: more blur in the first macro-cycle (a wider basin of attraction) and a
    tighter geometry target, since the map constrains the model less. Secondary-structure,
    Ramachandran and rotamer restraints (hpcrefine.lowres) are on at resolutions worse than
    LOWRES_RESTRAINTS_FROM (4.0 A).

    Protocol: at 4.5 A or better the macro-cycles alone ("minimise"): models refined at such
    resolutions are mostly placed already, and the rigid and morph steps neither help nor harm
    there (adk shaken by 0.8 A, 3.5 A map: CA RMSD 0.265 A without, 0.266 A with
    morph,rigid,morph). Worse than 4.5 A, "rigid,morph,minimise,adp": starts from homologues or
    other states sit domains away from their density. Measured (scripts/bench_protocol.py, adk
    open placed by its core in a 5 A map of adk closed, the three domains as rigid groups),
    C-alpha RMSD in place from 7.66 A: minimise 6.90, rigid,minimise 0.44, morph,minimise 0.38,
    morph,rigid,morph,minimise 0.38, rigid,morph,minimise 0.36 A (0.40 A without rigid groups).
    ADP at the end refines the B against the map (Pearson r with the true B 0.82 at 5 A, 0.88 at
    3.5 A). The occupancy step is in no default protocol: defaults are resolved from the
    resolution before the model is read, it needs conformers that the macro-cycles keep apart
    (the default fast target collapses weak ones onto strong ones: occupancy error 0.25 after
    minimise,occupancy at 3 A, 0.08 with --target fit), and at 4 A it barely beats the start
    (scripts/bench_occupancy.py: mean error 0.111 against 0.140; 0.046 at 3 A).

    Rotamer margin (the score gain the rotamer step asks of a new side chain): 0.2 map sd up to
    ROTAMER_MARGIN_FROM (3.5 A), 0.3 beyond, where the scores are flatter. Measured
    (scripts/bench_rotamer.py --resolutions 3 3.5 4 5 6 --margin M, adk closed in simulated maps
    of itself): the true model's side chains the step changes at 3 / 3.5 / 4 / 5 / 6 A, margin
    0.2: 0 / 4 / 13 / 22 / 14, 0.3: 0 / 1 / 4 / 11 / 6, 0.4: 0 / 0 / 1 / 2 / 3 (moved more than 40
    deg in chi 1: at most 3 at any margin); all 165 side chains started wrong, chi 1 within 40 deg
    after the step, 0.2: 100 / 98.2 / 95.8 / 93.9 / 91.5 %, 0.3: 99.4 / 98.2 / 95.8 / 92.1 / 87.3
    %, 0.4: 99.4 / 97.0 / 93.3 / 89.7 / 84.2 %. 0.3 keeps the recovery at 4 A and halves the
    needless changes at 4-6 A; 0.4 costs 2.5-7 % of the recovery to spare at most one chi 1 move.
    """
    low = resolution > LOWRES_RESTRAINTS_FROM
    lowres = {"ss_restraints": low, "rama_restraints": low, "rotamer_restraints": low,
              "rotamer_margin": 0.2 if resolution <= ROTAMER_MARGIN_FROM else 0.3}
    if resolution <= 3.0:
        return {"map_blur_start": 0.0, "macro_cycles": 3, **lowres}
    if resolution <= 4.5:
        return {"map_blur_start": 40.0, "macro_cycles": 4, **lowres}
    return {"map_blur_start": 80.0, "macro_cycles": 4, "angle_rmsd_max": 1.3, **lowres,
            "protocol": "rigid,morph,minimise,adp"}


LOWRES_RESTRAINTS_FROM = 4.0       # A: low-resolution restraints on at worse resolutions
ROTAMER_MARGIN_FROM = 3.5          # A: the larger rotamer margin at worse resolutions


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
    if (overrides or {}).get("ncs") not in (None, "auto", "constraints", "restraints", "off"):
        raise InputError(f"--ncs must be auto, constraints, restraints or off, got {overrides['ncs']!r}")
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
    from .protocol.steps import parse_protocol
    values["protocol"] = ",".join(parse_protocol(values.get("protocol", "minimise")))
    if len(values.get("morph_blurs", [0] * 3)) != len(values.get("morph_radii", [0] * 3)):
        raise InputError("morph_blurs and morph_radii must have one entry per morph round each")
    if values.get("prepare_target", "fit") not in ("fit", "fast"):
        raise InputError(f"prepare_target must be fit or fast, got {values['prepare_target']!r}")
    if values.get("decomposition", "auto") not in ("auto", "boxes", "blocks"):
        raise InputError(f"decomposition must be auto, boxes or blocks, got {values['decomposition']!r}")
    if values.get("halfset_layout", "auto") not in ("auto", "parallel", "shared"):
        raise InputError(f"halfset_layout must be auto, parallel or shared, got {values['halfset_layout']!r}")
    mem = values.get("worker_memory_gb", 0.0)
    if isinstance(mem, bool) or not isinstance(mem, (int, float)) or not mem >= 0:
        raise InputError(f"worker_memory_gb must be >= 0 (0: measured), got {mem!r}")
    if values.get("adp_mode", "individual") not in ("individual", "group"):
        raise InputError(f"adp_mode must be individual or group, got {values['adp_mode']!r}")
    for name in ("ss_restraints", "rama_restraints", "rotamer_restraints", "cycle_rotamers",
                 "ncs_average_map", "halfset_fixed_operators", "whole_model_on_workers", "ncs_exact_group"):
        if not isinstance(values.get(name, False), bool):
            raise InputError(f"{name} must be true or false, got {values[name]!r}")
    tol = values.get("ncs_group_tolerance", 0.5)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0:
        raise InputError(f"ncs_group_tolerance must be > 0 (A), got {values['ncs_group_tolerance']!r}")
    params = RefineParams(**values)
    from .protocol.anneal import check_anneal_params
    from .protocol.idealise import check_idealise_params
    from .protocol.rotamer_fit import check_rotamer_params
    for check in (check_anneal_params, check_idealise_params, check_rotamer_params):
        check(params)
    return params
