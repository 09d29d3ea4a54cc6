"""Bad input: one clear message on stderr, exit code 2, and nothing written to the output directory."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import gemmi
import numpy as np
import pytest

from hpcrefine.cli import main
from hpcrefine.mapio import write_map, read_map


def run(args, capsys):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture()
def out(tmp_path):
    """An output directory holding an earlier result that must survive every failure."""
    d = tmp_path / "out"
    d.mkdir()
    (d / "keep.txt").write_text("earlier result")
    return d


def assert_untouched(d):
    assert sorted(os.listdir(d)) == ["keep.txt"]
    assert (d / "keep.txt").read_text() == "earlier result"


def refine_args(model, out, maps=None, resolution="3.5", half=None):
    args = ["refine", model, "--resolution", resolution, "--output", str(out), "--overwrite"]
    if maps:
        args += ["--map", maps]
    if half:
        args += ["--half-maps", *half]
    return args


@pytest.mark.parametrize("resolution", ["abc", "-1", "0", "nan", "inf"])
def test_bad_resolution(adk_case, out, capsys, resolution):
    rc, err = run(refine_args(adk_case["start"], out, adk_case["full"], resolution), capsys)
    assert rc == 2 and "--resolution must be a positive number" in err
    assert err.count("\n") == 0
    assert_untouched(out)


def test_missing_model(adk_case, out, capsys, tmp_path):
    rc, err = run(refine_args(str(tmp_path / "nope.cif"), out, adk_case["full"]), capsys)
    assert rc == 2 and "model file not found" in err
    assert_untouched(out)


@pytest.mark.parametrize("cut", [0, 0.5])
def test_truncated_or_empty_model(adk_case, out, capsys, tmp_path, cut):
    text = open(adk_case["start"]).read()
    bad = tmp_path / "bad.cif"
    bad.write_text(text[: int(len(text) * cut)])
    rc, err = run(refine_args(str(bad), out, adk_case["full"]), capsys)
    assert rc == 2 and ("empty" in err or "cannot read model" in err or "no atoms" in err), err
    assert_untouched(out)


def test_missing_map(adk_case, out, capsys, tmp_path):
    rc, err = run(refine_args(adk_case["start"], out, str(tmp_path / "none.mrc")), capsys)
    assert rc == 2 and "none.mrc" in err
    assert_untouched(out)


def test_truncated_map(adk_case, out, capsys, tmp_path):
    bad = tmp_path / "cut.mrc"
    data = open(adk_case["full"], "rb").read()
    bad.write_bytes(data[: len(data) // 2])
    rc, err = run(refine_args(adk_case["start"], out, str(bad)), capsys)
    assert rc == 2 and "cut.mrc" in err
    assert_untouched(out)


def test_nan_map(adk_case, out, capsys, tmp_path):
    g = read_map(adk_case["full"])
    data = np.array(g.data, dtype=np.float32)
    data[3, 4, 5] = np.nan
    bad = tmp_path / "nan.mrc"
    write_map(str(bad), data, g.origin, g.voxel)
    rc, err = run(refine_args(adk_case["start"], out, str(bad)), capsys)
    assert rc == 2 and "NaN" in err
    assert_untouched(out)


def test_half_maps_on_different_grids(adk_case, out, capsys, tmp_path):
    g = read_map(adk_case["half2"])
    other = tmp_path / "h2.mrc"
    write_map(str(other), np.array(g.data), g.origin, g.voxel * 1.01)
    rc, err = run(refine_args(adk_case["start"], out, half=[adk_case["half1"], str(other)]), capsys)
    assert rc == 2 and "voxel" in err
    shutil.copy(adk_case["half2"], other)
    small = tmp_path / "h2small.mrc"
    write_map(str(small), np.array(g.data)[:-2], g.origin, g.voxel)
    rc, err = run(refine_args(adk_case["start"], out, half=[adk_case["half1"], str(small)]), capsys)
    assert rc == 2 and ("grid" in err.lower() or "shape" in err.lower())
    assert_untouched(out)


def test_model_outside_map(adk_case, out, capsys, tmp_path):
    st = gemmi.read_structure(adk_case["start"])
    st[0].transform_pos_and_adp(gemmi.Transform(gemmi.Mat33(), gemmi.Vec3(200, 0, 0)))
    moved = tmp_path / "moved.cif"
    st.make_mmcif_document().write_file(str(moved))
    rc, err = run(refine_args(str(moved), out, adk_case["full"]), capsys)
    assert rc == 2 and "outside" in err
    assert_untouched(out)


def test_unknown_residue(adk_case, out, capsys, tmp_path):
    st = gemmi.read_structure(adk_case["start"])
    st[0][0][100].name = "XYZ"
    bad = tmp_path / "xyz.cif"
    st.make_mmcif_document().write_file(str(bad))
    rc, err = run(refine_args(str(bad), out, adk_case["full"]), capsys)
    assert rc == 2 and "XYZ" in err and "--ligand" in err
    assert_untouched(out)


def test_no_map_given(adk_case, out, capsys):
    rc, err = run(refine_args(adk_case["start"], out), capsys)
    assert rc == 2 and "map" in err
    assert_untouched(out)


def test_console_script_exit_code(adk_case, out, tmp_path):
    """The installed command, run as a user runs it."""
    exe = os.path.join(os.path.dirname(sys.executable), "hpcrefine")
    p = subprocess.run([exe, *refine_args(str(tmp_path / "missing.pdb"), out, adk_case["full"])],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("hpcrefine: error: model file not found")
    assert "Traceback" not in p.stderr
    assert_untouched(out)
