"""Half-set validation on the adenylate kinase case: free statistics, weight, error estimate."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from hpcrefine import halfset
from hpcrefine.compare import per_residue_error
from hpcrefine.engine import GeometryTerm
from hpcrefine.errors import InputError
from hpcrefine.modelio import read_model
from hpcrefine.params import build_params
from hpcrefine.refine import atom_weights, load_inputs


@pytest.fixture(scope="module")
def run(adk_refined):
    return adk_refined, json.loads((adk_refined / "report.json").read_text())


def test_report_has_the_halfset_section(run):
    out, report = run
    h = report["halfset"]
    assert len(h["weights_tried"]) == len(halfset.WEIGHT_FACTORS)
    for t in h["weights_tried"]:
        assert set(t) >= {"weight", "fsc_work_avg", "fsc_free_avg", "free_residual", "bond_rmsd",
                          "angle_rmsd"}
        assert t["free_residual"] == pytest.approx(1 - t["fsc_free_avg"], abs=1e-3)
    tried = [t["weight"] for t in h["weights_tried"]]
    assert min(tried) <= h["chosen_weight"] <= max(tried)
    assert h["nearest_weight_tried"] in [pytest.approx(w, rel=1e-3) for w in tried]
    assert h["final_weight"] == pytest.approx(halfset.FULL_MAP_WEIGHT_FACTOR * h["chosen_weight"], rel=1e-3)
    # the final refinement ran at that weight, or lower where the geometry limits required
    assert all(c["weight"] <= h["final_weight"] * 1.001 for c in report["cycles"])
    assert report["after"]["bond_rmsd"] <= 0.012
    assert len(h["fsc"]["s"]) == len(h["fsc"]["work"]) == len(h["fsc"]["free"]) > 5
    assert max(h["fsc"]["s"]) <= 1 / 3.5
    e = h["per_residue_error"]
    assert len(e["chain"]) == len(e["seqid"]) == len(e["error"]) == 214
    assert (out / "fsc_halfset.png").stat().st_size > 1000
    assert report["timings"]["half sets"]["calls"] == 1


def test_free_below_work(run):
    h = run[1]["halfset"]
    chosen = min(h["weights_tried"], key=lambda t: abs(t["weight"] - h["nearest_weight_tried"]))
    print("FSC_work avg", chosen["fsc_work_avg"], "FSC_free avg", chosen["fsc_free_avg"],
          "ratio", h["free_work_ratio_observed"])
    for t in h["weights_tried"]:
        assert t["fsc_free_avg"] < t["fsc_work_avg"]
    assert h["free_work_ratio_observed"] > 1.0


def test_error_estimate_follows_the_real_error(adk_case, run):
    out, report = run
    final = read_model(str(out / "refined.cif"))
    truth = read_model(adk_case["truth"])
    real = per_residue_error(final.xyz, truth.xyz, final.res_index, final.n_residues)
    est = np.array(report["halfset"]["per_residue_error"]["error"])
    rho = spearmanr(est, real).correlation
    print(f"Spearman (estimated vs real per-residue error): {rho:.3f}")
    assert rho > 0.2


def test_free_statistics_use_unseen_data(adk_case):
    """Refining half set 1 four times harder raises FSC_work, not FSC_free (beyond noise)."""
    params = build_params(3.5)
    inputs = load_inputs(adk_case["start"], None, [adk_case["half1"], adk_case["half2"]], None, [],
                         need_map=True)
    geom = GeometryTerm(inputs.restraints, params)
    g = inputs.map
    term = halfset.half_term(inputs.half_maps[0].data, g.origin, g.voxel, 3.5, atom_weights(inputs.model))
    from hpcrefine.engine import RealSpaceTerm, initial_weight
    w = initial_weight(inputs.model.xyz, RealSpaceTerm(inputs.data, g.origin, g.voxel,
                                                       atom_weights(inputs.model)), geom)
    halves = halfset.HalfTransforms(inputs.half_maps, 3.5)
    res = {}
    for f in (1, 4):
        xyz, _ = halfset.refine_half(inputs.model.xyz, term, geom, w * f, params)
        res[f] = halfset.compare_models(inputs.model, {1: xyz}, halves)[1]
        print(f"weight x{f}: FSC_work {res[f]['work_avg']:.4f} FSC_free {res[f]['free_avg']:.4f}")
    assert res[4]["work_avg"] > res[1]["work_avg"]
    assert res[4]["free_avg"] <= res[1]["free_avg"] + 0.005


def test_kept_half_map_transforms_give_the_full_transforms_results(adk_case):
    """The compare step's FSCs from the half maps' kept coefficients (HalfTransforms, transformed
    axis by axis keeping the cube) equal those of the whole maps' transforms up to the resolution
    (to rounding); the low-passed half map is mapstats.lowpass's, its blurred copy
    density.blur_map's (to float32 rounding)."""
    from hpcrefine.core.density import blur_map, normalise_map
    from hpcrefine.mapstats import atom_density, lowpass, lowpass_coefficients
    from hpcrefine.simulate import _rfftn, fsc_of_transforms

    inputs = load_inputs(adk_case["start"], None, [adk_case["half1"], adk_case["half2"]], None, [],
                         need_map=True)
    g, model = inputs.map, inputs.model
    halves = halfset.HalfTransforms(inputs.half_maps, 3.5)
    # the cube keeps the coefficients to 1/3.5 A and one shell more: well under the whole array
    assert halves.coefficients(1).size < 0.5 * _rfftn(np.asarray(g.data, dtype=np.float32)).size
    got = halfset.compare_models(model, {1: model.xyz, 2: model.xyz}, halves)
    calc = _rfftn(atom_density(model.xyz, model.element, model.b, model.occ, g.data.shape, g.origin,
                               g.voxel, 3.5))
    lowpass_coefficients(calc, g.data.shape, g.voxel, 3.5)
    s = got[1]["s"]
    keep = s <= 1 / 3.5
    for h in (1, 2):
        for name, other in (("work", h), ("free", 3 - h)):
            _, want = fsc_of_transforms(calc, _rfftn(np.asarray(inputs.half_maps[other - 1].data,
                                                                 dtype=np.float32)), g.data.shape, g.voxel)
            assert np.max(np.abs(got[h][name][keep] - want[keep])) < 1e-5, (h, name)
            assert np.all(got[h][name][~keep] == 0) and np.all(want[~keep] == 0)
    assert 0.3 < got[1]["free_avg"] < 1 and 0.3 < got[1]["work_avg"] < 1
    data = np.asarray(inputs.half_maps[0].data, dtype=np.float32)
    low = lowpass(data, np.asarray(g.voxel), 3.5)
    assert np.max(np.abs(halves.lowpassed(1) - low)) < 1e-5 * np.max(np.abs(low))
    want = normalise_map(blur_map(normalise_map(low), g.voxel, 40.0))
    blurred = normalise_map(halves.lowpassed(1, 40.0))
    assert np.max(np.abs(blurred - want)) < 1e-5 * np.max(np.abs(want))
    # the normalisation's factor of a blurred copy, from the coefficients alone: the ratio of
    # the maps' standard deviations (the normalised blurred map is the blurred normalised map
    # times it)
    for h, b in ((1, 40.0), (2, 40.0), (1, 300.0)):
        plain, blur = halves.lowpassed(h), halves.lowpassed(h, b)
        ratio = plain.std(dtype=np.float64) / blur.std(dtype=np.float64)
        assert ratio > 1.05
        assert halves.blur_scale(h, b) == pytest.approx(ratio, rel=1e-6), (h, b)
    scaled = halves.blur_scale(1, 40.0) * blur_map(normalise_map(low), g.voxel, 40.0)
    assert np.max(np.abs(scaled - want)) < 1e-5 * np.max(np.abs(want))
    # on grids of even and odd x sizes (the half-complex layout's last plane counted once or twice)
    from hpcrefine.mapio import MapGrid
    rng = np.random.default_rng(7)
    for nx in (40, 41):
        maps = [MapGrid(rng.normal(size=(36, 38, nx)).astype(np.float32), np.zeros(3), np.ones(3), "")
                for _ in (1, 2)]
        small = halfset.HalfTransforms(maps, 2.0)
        ratio = small.lowpassed(1).std(dtype=np.float64) / small.lowpassed(1, 20.0).std(dtype=np.float64)
        assert small.blur_scale(1, 20.0) == pytest.approx(ratio, rel=1e-6), nx
    # in the arrays kept for this thread: the same maps, one array for every call, let go of
    first = halves.lowpassed(1, 40.0, scratch=True)
    assert np.array_equal(first, halves.lowpassed(1, 40.0))
    again = halves.lowpassed(2, scratch=True)
    assert again is first and np.array_equal(again, halves.lowpassed(2))
    halves.release_scratch()
    assert halves.lowpassed(2, scratch=True) is not first
    # to_map (z on the cube, then y and x by slabs) is the inverse transform of the coefficients
    # padded with zeros, on grids of odd and even sizes
    from hpcrefine.simulate import CroppedTransform, _irfftn
    rng = np.random.default_rng(5)
    for shape in [(41, 37, 33), (40, 42, 44), (33, 64, 17)]:
        cube = CroppedTransform.for_resolution(shape, (1.1, 1.0, 1.2), 3.5)
        c = cube.transform(rng.normal(size=shape).astype(np.float32))
        cube.lowpass(c, 3.5)
        padded = np.zeros((shape[0], shape[1], shape[2] // 2 + 1), dtype=np.complex64)
        for n, k in enumerate(cube.iz):
            padded[k][cube.iy, :cube.nx] = c[n]
        ref = _irfftn(padded, shape)
        out = np.full(shape, np.nan, dtype=np.float32)
        work = np.full(cube.work_shape(), np.nan, dtype=np.complex64)
        got = cube.to_map(c, out=out, work=work, slab=7)
        assert got is out and np.max(np.abs(got - ref)) < 1e-6 * np.max(np.abs(ref)), shape
        assert np.array_equal(cube.to_map(c, slab=7), got)


def test_the_weighting_transforms_give_the_half_sets_coefficients(adk_case, monkeypatch):
    """load_inputs keeps the half maps' coefficients in the resolution's cube, cropped from the
    transforms of the full map's FSC weighting, and HalfTransforms takes them instead of
    transforming the half maps again: within rounding of its own transform, and the same
    compare-step FSCs; taken once, and only when their cube is the stage's."""
    from hpcrefine.simulate import CroppedTransform

    inputs = load_inputs(adk_case["start"], None, [adk_case["half1"], adk_case["half2"]], None, [],
                         need_map=True, params=build_params(3.5))
    kept = inputs.half_coefficients
    assert kept is not None and len(kept) == 2
    fresh = halfset.HalfTransforms(inputs.half_maps, 3.5)
    for h in (1, 2):
        want = fresh.coefficients(h)
        assert kept[h - 1].shape == want.shape
        assert np.max(np.abs(kept[h - 1] - want)) < 1e-6 * np.max(np.abs(want))
    calls = []
    transform = CroppedTransform.transform
    monkeypatch.setattr(CroppedTransform, "transform",
                        lambda self, data, slab=16, **kw: calls.append(data.shape) or transform(self, data, slab, **kw))
    halves = halfset.HalfTransforms(inputs.half_maps, 3.5, inputs.take_half_coefficients())
    assert inputs.half_coefficients is None and inputs.take_half_coefficients() is None
    assert halves.coefficients(1) is kept[0] and halves.coefficients(2) is kept[1] and not calls
    model = inputs.model
    got, want = (halfset.compare_models(model, {1: model.xyz, 2: model.xyz}, t) for t in (halves, fresh))
    for h in (1, 2):
        for name in ("work", "free"):
            assert np.max(np.abs(got[h][name] - want[h][name])) < 1e-5, (h, name)
    # the model map and its coefficients are arrays kept from one compare step to the next:
    # two models in a row give what each gives alone
    from hpcrefine.simulate import shake
    shaken = shake(model.xyz, 0.5, seed=3)
    both = halfset.compare_models(model, {1: model.xyz, 2: shaken}, fresh)
    for h, x in ((1, model.xyz), (2, shaken)):
        alone = halfset.compare_models(model, {h: x}, halfset.HalfTransforms(inputs.half_maps, 3.5))[h]
        assert all(np.array_equal(both[h][k], alone[k]) for k in ("work", "free")), h
    assert both[1]["work_avg"] != both[2]["free_avg"]
    # another resolution's cube: the kept arrays do not fit and the half maps are transformed
    calls.clear()
    other = halfset.HalfTransforms(inputs.half_maps, 5.0, kept)
    assert other.coefficients(1).shape != kept[0].shape and len(calls) == 1


def test_expected_free_work_ratio_is_reported(run):
    _, report = run
    exp = report["halfset"]["free_work_ratio_expected"]
    assert exp["observations"] > exp["effective_parameters"] > 0
    assert 1.0 < exp["ratio"] < 2.0
    assert report["halfset"]["free_work_ratio_observed"] > 1.0


def test_free_minimum_interpolates_between_neighbours():
    w = [1.0, 2.0, 4.0, 8.0]
    # a parabola in log2(w) with its minimum at log2(w) = 1.5
    res = [(np.log2(x) - 1.5) ** 2 + 0.4 for x in w]
    wf, best = halfset.free_minimum(w, res, [True] * 4)
    assert best in (1, 2) and wf == pytest.approx(2 ** 1.5, rel=1e-6)
    # the best weight at the edge of the grid, or a neighbour outside the limits: no extrapolation
    assert halfset.free_minimum(w, [0.1, 0.2, 0.3, 0.4], [True] * 4) == (1.0, 0)
    wf, best = halfset.free_minimum(w, res, [False, True, True, True])
    assert best == 1 and wf == 2.0
    # nothing acceptable: the lowest weight
    assert halfset.free_minimum(w, res, [False] * 4) == (1.0, 0)


def test_weight_layout_spreads_weights_over_the_workers_of_each_half():
    n = len(halfset.WEIGHT_FACTORS)
    assert set(halfset.weight_layout(1, n).values()) == {0}
    assert set(halfset.weight_layout(2, n).values()) == {1}
    lay3 = halfset.weight_layout(3, n)
    assert {lay3[(1, k)] for k in range(n)} == {1} and {lay3[(2, k)] for k in range(n)} == {2}
    lay9 = halfset.weight_layout(9, n)        # 4 workers per half: one weight each
    assert [lay9[(1, k)] for k in range(n)] == [1, 3, 5, 7]
    assert [lay9[(2, k)] for k in range(n)] == [2, 4, 6, 8]
    lay5 = halfset.weight_layout(5, n)        # 2 workers per half: two weights each
    assert [lay5[(1, k)] for k in range(n)] == [1, 3, 1, 3]
    # halfset_layout "shared": all the workers refine every task; the first worker sends
    assert set(halfset.weight_layout(5, n, shared=True).values()) == {1}
    assert build_params(3.5, overrides={"halfset_layout": "shared"}).halfset_layout == "shared"
    with pytest.raises(InputError, match="halfset_layout must be auto, parallel or shared"):
        build_params(3.5, overrides={"halfset_layout": "one"})


def test_refine_reports_validation_of_start_and_final(run):
    out, report = run
    v = report["validation"]
    s, f = v["start"], v["final"]
    print("Ramachandran outliers % start / final:", s["ramachandran"]["outlier_pct"], f["ramachandran"]["outlier_pct"])
    assert f["ramachandran"]["outlier_pct"] < s["ramachandran"]["outlier_pct"] / 5
    assert f["ramachandran"]["favoured_pct"] > 85
    assert f["clashes"]["clashscore"] < s["clashes"]["clashscore"] / 10
    assert f["map"]["cc_mask"] > s["map"]["cc_mask"]
    assert (out / "validation_final.json").exists() and (out / "validation_final_ramachandran.png").exists()


def test_fsc_weighted_mean_of_halves_from_their_transforms(adk_case):
    """The FSC-weighted mean of the half maps, made from the halves' two transforms, equals the
    weighting of the mean map computed first (a third transform), to float32 rounding."""
    from hpcrefine.mapio import read_map
    from hpcrefine.mapstats import fsc_weighted

    h1, h2 = (np.asarray(read_map(adk_case[k]).data, dtype=np.float32) for k in ("half1", "half2"))
    voxel = read_map(adk_case["half1"]).voxel
    got, curve = fsc_weighted(None, h1, h2, voxel)
    want, want_curve = fsc_weighted((h1 + h2) / 2, h1, h2, voxel)
    assert curve == want_curve
    assert np.max(np.abs(got - want)) < 1e-5 * np.max(np.abs(want))


def test_half_set_starts_are_independent_of_a_shaken_start(adk_case):
    """Each half set starts from the model displaced by halfset_start_shake, along a random stream
    of its own: a start made by `hpcrefine shake --seed 1` or `--seed 2` is not displaced again
    along its own errors (with integer seeds 1 and 2, half set 2 of a seed-2 start began 1.1 A
    from the truth, half set 1 0.85 A), and with fix_chirality its inverted centres are put back."""
    from hpcrefine.core.geometry import inverted_chirals
    from hpcrefine.halfset import half_start
    from hpcrefine.modelio import read_model
    from hpcrefine.monlib import MonomerLibrary, resolve_monlib_dir
    from hpcrefine.params import RefineParams
    from hpcrefine.simulate import shake
    from hpcrefine.topology import build_restraints

    truth = read_model(adk_case["truth"])
    params = RefineParams(resolution=3.5)
    for seed in (1, 2):
        start = shake(truth.xyz, 0.8, seed)
        for half in (1, 2):
            d = half_start(start, params, half) - truth.xyz
            rms = np.sqrt(np.mean(np.sum(d * d, axis=1)))
            assert abs(rms - np.hypot(0.8, 0.3)) < 0.03, (seed, half, rms)
    lib = MonomerLibrary(resolve_monlib_dir(None))
    lib.load(set(truth.res_names.tolist()), [])
    r = build_restraints(truth, lib)
    start = shake(truth.xyz, 0.8, 2)
    assert len(inverted_chirals(half_start(start, params, 1), r)) > 20
    assert len(inverted_chirals(half_start(start, params, 1, r), r)) == 0
