"""Checkpoints and restarts under mpiexec, as a user (or SLURM) interrupts a run: SIGUSR1 to one
rank, SIGKILL of one rank, damaged and foreign checkpoints."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from hpcrefine import checkpoint as ck
from hpcrefine.modelio import read_model

BIN = Path(sys.executable).parent


def refine_cmd(case, out, n, *extra):
    return [str(BIN / "mpiexec"), "-n", str(n), str(BIN / "hpcrefine"), "refine", case["start"],
            "--half-maps", case["half1"], case["half2"], "--resolution", "3.5", "--output", str(out),
            "--iterations", "300", "--checkpoint-steps", "1", *extra]


def ranks_of(out) -> list[int]:
    """PIDs of the hpcrefine ranks writing to out (the mpiexec process excluded)."""
    p = subprocess.run(["pgrep", "-f", f"python[0-9.]* [^ ]*bin/hpcrefine refine .*--output {out} "],
                       capture_output=True, text=True)
    return sorted(int(x) for x in p.stdout.split())


def wait_for_stage(path, stage, min_steps=0, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            m = ck.read_meta(str(path))
            if m["state_stage"] == stage and m["steps"] >= min_steps:
                return m
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{path} never reached stage {stage}")


def coords(out):
    return read_model(str(out / "refined.cif")).xyz


@pytest.fixture(scope="module")
def uninterrupted(adk_case, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "plain"
    p = subprocess.run(refine_cmd(adk_case, out, 3), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    return out


def test_sigusr1_to_one_rank_then_resume_is_bit_identical(adk_case, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(refine_cmd(adk_case, out, 3, "--resume"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_stage(out / ck.NAME, "final", min_steps=12)
    pids = ranks_of(out)
    assert len(pids) == 3
    os.kill(pids[-1], signal.SIGUSR1)              # one worker only: the others must hear of it
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ck.INTERRUPTED_EXIT, err[-2000:]
    assert err.count("interrupted by a signal") == 1
    meta = ck.read_meta(str(out / ck.NAME))
    assert meta["status"] == "interrupted" and meta["state_stage"] == "final"
    saved = tmp_path / "saved.h5"
    shutil.copy(out / ck.NAME, saved)
    # the same command line continues and ends exactly where the uninterrupted run ended
    p = subprocess.run(refine_cmd(adk_case, out, 3, "--resume"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.array_equal(coords(out), coords(uninterrupted))
    report = json.loads((out / "report.json").read_text())
    assert report["restarts"] == 1 and report["checkpoint"]["writes"] > 1
    with h5py.File(out / ck.NAME, "r") as f:           # the trajectory is readable with plain h5py
        assert f.attrs["status"] == "done"
        assert f["trajectory/xyz"].shape[0] == 1 + 8 + 4 == len(f["trajectory/info"])
        assert np.allclose(f["trajectory/xyz"][-1], coords(out), atol=1e-3)
    # another rank count continues the same checkpoint, within summation-order differences
    other = tmp_path / "other"
    p = subprocess.run(refine_cmd(adk_case, other, 2, "--restart", str(saved)), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    d = np.sqrt(np.mean(np.sum((coords(other) - coords(uninterrupted)) ** 2, axis=1)))
    print(f"restart with 2 ranks instead of 3: rms difference {d:.2e} A")
    assert d < 0.05


def test_sigusr1_to_every_rank_in_the_half_set_stage_then_resume(adk_case, uninterrupted, tmp_path):
    """As srun forwards a SLURM warning: every rank gets the signal, here while the half sets run."""
    out = tmp_path / "run"
    proc = subprocess.Popen(refine_cmd(adk_case, out, 3, "--resume"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_stage(out / ck.NAME, "halfset", min_steps=2)
    pids = ranks_of(out)
    assert len(pids) == 3
    for pid in pids:
        os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ck.INTERRUPTED_EXIT, err[-2000:]
    assert err.count("interrupted by a signal") == 1
    meta = ck.read_meta(str(out / ck.NAME))
    assert meta["status"] == "interrupted" and meta["state_stage"] in ("halfset", "final")
    p = subprocess.run(refine_cmd(adk_case, out, 3, "--resume"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.array_equal(coords(out), coords(uninterrupted))


def test_sigkill_of_one_rank_ends_the_job_and_the_checkpoint_completes_it(adk_case, uninterrupted, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(refine_cmd(adk_case, out, 3, "--resume"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for_stage(out / ck.NAME, "halfset", min_steps=3)
    os.kill(ranks_of(out)[1], signal.SIGKILL)
    t0 = time.monotonic()
    proc.communicate(timeout=60)
    print(f"job ended {time.monotonic() - t0:.1f} s after SIGKILL, exit code {proc.returncode}")
    assert proc.returncode not in (0, ck.INTERRUPTED_EXIT)
    # mpiexec may return while the ranks it killed are still exiting (CI saw one 0.0 s after):
    # they must be gone within seconds
    deadline = time.monotonic() + 10
    while ranks_of(out) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ranks_of(out)
    ck.read_meta(str(out / ck.NAME))                    # the last checkpoint is whole
    p = subprocess.run(refine_cmd(adk_case, out, 3, "--resume"), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.array_equal(coords(out), coords(uninterrupted))


def test_single_process_interrupt_and_resume(adk_case, uninterrupted, tmp_path):
    out = tmp_path / "one"
    cmd = [str(BIN / "hpcrefine"), *refine_cmd(adk_case, out, 1)[4:], "--resume"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_stage(out / ck.NAME, "final", min_steps=10)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == ck.INTERRUPTED_EXIT
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    plain = tmp_path / "plain1"
    p = subprocess.run([str(BIN / "hpcrefine"), *refine_cmd(adk_case, plain, 1)[4:]], capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert np.array_equal(coords(out), coords(plain))
    # resuming a finished run does nothing and succeeds (the next job of a chain)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0 and "finished already" in p.stdout


def test_damaged_foreign_and_mismatched_checkpoints_are_refused(adk_case, uninterrupted, tmp_path):
    from hpcrefine.cli import main

    good = uninterrupted / ck.NAME
    # a finished run cannot be restarted
    base = ["refine", adk_case["start"], "--half-maps", adk_case["half1"], adk_case["half2"],
            "--resolution", "3.5", "--iterations", "300", "--output", str(tmp_path / "o")]
    assert main(base + ["--restart", str(good)]) == 2
    # an interrupted-looking copy with other parameters: refused, --force accepts it
    mid = tmp_path / "mid.h5"
    shutil.copy(good, mid)
    with h5py.File(mid, "r+") as f:
        f["state"].attrs["stage"] = "final"
        f["state"].attrs["cycle"] = 5
    rc = main(["refine", adk_case["start"], "--half-maps", adk_case["half1"], adk_case["half2"],
               "--resolution", "3.5", "--iterations", "200", "--output", str(tmp_path / "p"),
               "--restart", str(mid)])
    assert rc == 2
    truncated = tmp_path / "truncated.h5"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    for path, words in ((truncated, "damaged or incomplete"), (foreign, "not an hpcrefine checkpoint"),
                        (tmp_path / "missing.h5", "not found")):
        with pytest.raises(Exception) as e:
            ck.read_meta(str(path))
        assert words in str(e.value)
        assert main(base + ["--restart", str(path)]) == 2
    assert not (tmp_path / "o").exists()
    # other inputs: the shaken start is not the true model
    with pytest.raises(Exception, match="another model"):
        ident = ck.RunIdentity.of(adk_case["truth"], [adk_case["half1"], adk_case["half2"]], {}, 3, "", "")
        ck.check_compatible(str(mid), ident, force=True)


def test_status_prints_where_a_run_is(uninterrupted, capsys):
    from hpcrefine.cli import main

    assert main(["status", str(uninterrupted / ck.NAME)]) == 0
    out = capsys.readouterr().out
    assert "stage done" in out and "FSC_work" in out and "last step" in out


def test_a_macro_cycles_minimisations_keep_their_statistics(tmp_path):
    """The current macro-cycle's completed minimisations are written with the geometry statistics
    their minimiser returned and read back bit for bit: a resumed run judges a replayed weight
    trial (and predicts the next weight from it) on the numbers of the original run."""
    import numpy as np

    from hpcrefine.checkpoint import CallRecord, CheckpointWriter, RunIdentity, RunState, load_state

    rng = np.random.default_rng(3)
    xyz = rng.normal(size=(7, 3))
    from hpcrefine.engine import STATISTICS_KEYS

    stats = {k: 0.5 / (i + 3) for i, k in enumerate(STATISTICS_KEYS)}
    stats.update(bond_rmsd=0.1 / 3, angle_rmsd=2.0 / 7, clashes=12, chiral_inversions=0,
                 planarity_rmsd=float("nan"))
    state = RunState(stage="final", cycle=2, xyz=xyz)
    state.calls = [CallRecord(xyz + 1, -1.5, 30, 33, 2.5, dict(stats)), CallRecord(xyz + 2, -2.5, 30, 31, 2.0)]
    ident = RunIdentity(model="m.cif", model_sha256="0", maps={}, params={}, ranks=1, command="refine")
    path = str(tmp_path / "checkpoint.h5")
    CheckpointWriter(path, ident, {"workers": 1}, np.zeros(7), 0, 0.0).write(state)
    back = load_state(path, 7)
    assert len(back.calls) == 2 and back.calls[1].statistics is None
    got = back.calls[0].statistics
    assert got["bond_rmsd"] == stats["bond_rmsd"] and got["angle_rmsd"] == stats["angle_rmsd"]
    assert got["clashes"] == 12 and isinstance(got["clashes"], int) and np.isnan(got["planarity_rmsd"])
    assert np.array_equal(back.calls[0].xyz, xyz + 1)


def test_only_the_rank_that_checkpoints_keeps_the_minimisations_and_frames(tmp_path):
    """The master (the rank with the checkpoint writer) records every minimisation of the
    macro-cycle in progress and the trajectory's frames for its checkpoint; a worker (no writer)
    keeps none, yet replays a continued run's recorded minimisations as the master does. Before,
    every worker kept a copy of the whole model for each minimisation of the macro-cycle (each
    weight trial: 24 MB each at a million atoms) and every macro-cycle's frame to the run's end."""
    from hpcrefine.checkpoint import CallRecord, CheckpointWriter, RunIdentity, RunState
    from hpcrefine.engine import MinimiseResult
    from hpcrefine.log import Timer
    from hpcrefine.params import build_params
    from hpcrefine.refine import _Steps

    class Quiet:
        def poll(self):
            return False

    runs = []

    def inner(xyz0, term, geom, weight, iterations, params):
        runs.append(weight)
        return MinimiseResult(xyz=xyz0 + weight, f=-weight, iterations=3, evaluations=4, seconds=0.1)

    xyz = np.zeros((5, 3))
    ident = RunIdentity(model="m.cif", model_sha256="0", maps={}, params={}, ranks=1, command="refine")
    writer = CheckpointWriter(str(tmp_path / "checkpoint.h5"), ident, {"workers": 1}, np.zeros(5), 0, 0.0)
    params = build_params(3.5)
    kept = {}
    for name, w in (("master", writer), ("worker", None)):
        # a continued run: one minimisation of the macro-cycle recorded before the stop
        state = RunState(stage="final", cycle=1, xyz=xyz)
        state.calls = [CallRecord(xyz + 7.0, -7.0, 3, 4, 0.1)]
        steps = _Steps(None, state, w, Quiet(), params, inner, Timer())
        replayed = steps.minimiser(xyz, None, None, 1.0, 3, params)
        fresh = [steps.minimiser(xyz, None, None, k, 3, params) for k in (2.0, 3.0)]
        steps.frame(fresh[-1].xyz, {"stage": "final", "cycle": 1})
        assert replayed.f == -7.0 and [r.f for r in fresh] == [-2.0, -3.0]
        kept[name] = (len(state.calls), len(state.frames))
    assert runs == [2.0, 3.0, 2.0, 3.0]           # the same minimisations run on both
    assert kept == {"master": (3, 1), "worker": (1, 0)}


def test_inputs_hashed_ahead_in_a_thread(adk_case, tmp_path):
    """checkpoint.hash_ahead (rank 1 checksums the inputs while it waits for the others): the same
    checksums as file_sha256, the files it cannot read left out, and a RunIdentity made from them
    equal to one that hashes the files itself."""
    files = [adk_case["start"], adk_case["half1"], adk_case["half2"]]
    missing = str(tmp_path / "not-there.mrc")
    got = ck.hash_ahead([files[0], None, *files[1:], missing, files[1]])()
    assert got == {p: ck.file_sha256(p) for p in files}
    own = ck.RunIdentity.of(files[0], files[1:], {"a": 1}, 3, "refine", "lib")
    ahead = ck.RunIdentity.of(files[0], files[1:], {"a": 1}, 3, "refine", "lib", got)
    assert ahead == own
    # a checksum it lacks is made on the spot
    assert ck.RunIdentity.of(files[0], files[1:], {"a": 1}, 3, "refine", "lib",
                             {files[0]: got[files[0]]}) == own


def test_a_write_in_a_thread_holds_the_state_of_its_call(adk_case, tmp_path):
    """CheckpointWriter.write(wait=False): the file holds the state as it was when the write was
    asked for (frames, tasks and cycle changed afterwards are not in it), the frames it wrote are
    not written twice, and the next write, which waits for it, adds the frames that came since.
    Made with adk's 1,656 atoms and 40 frames, so that the write is likely still in flight when
    the state changes (the copy taken at the call is what holds the state either way)."""
    from hpcrefine.checkpoint import CheckpointWriter, RunIdentity, RunState, load_state

    xyz = read_model(adk_case["start"]).xyz
    n = len(xyz)
    state = RunState(stage="halfset")
    state.frames = [(xyz + 0.01 * i, {"stage": "halfset", "i": i}) for i in range(40)]
    state.tasks = {(1, 0): np.arange(10.0)}
    ident = RunIdentity(model="m.cif", model_sha256="0", maps={}, params={}, ranks=3, command="refine")
    path = str(tmp_path / "checkpoint.h5")
    w = CheckpointWriter(path, ident, {"workers": 2}, np.zeros(n), 0, time.perf_counter())
    w.write(state, wait=False)
    state.frames.append((xyz + 1.0, {"stage": "final", "cycle": 1}))
    state.tasks[(2, 0)] = np.ones(10)
    state.stage, state.cycle = "final", 2
    w.finish()
    back = load_state(path, n)
    assert back.stage == "halfset" and back.n_frames == 40 and sorted(back.tasks) == [(1, 0)]
    assert ck.read_meta(path)["status"] == "running"
    assert state.n_frames == 40 and len(state.frames) == 1       # only the later frame to write
    w.write(state, "done", wait=False)
    w.write(state, "done")                                       # waits for the one in flight
    back = load_state(path, n)
    assert back.stage == "final" and back.cycle == 2 and back.n_frames == 41
    assert sorted(back.tasks) == [(1, 0), (2, 0)] and w.n_writes == 3
    with h5py.File(path, "r") as f:
        traj = f["trajectory/xyz"][:]
        info = [json.loads(s) for s in f["trajectory/info"].asstr()[:]]
    assert traj.shape == (41, n, 3) and info[-1] == {"stage": "final", "cycle": 1}
    assert np.allclose(traj[7], xyz + 0.07, atol=1e-4) and np.allclose(traj[40], xyz + 1.0, atol=1e-4)
    assert not os.path.exists(path + ".part")


def test_trajectory_written_before_with_gzip_is_continued(adk_case, tmp_path, monkeypatch):
    """The trajectory's coordinates are stored uncompressed; a checkpoint written with gzip (as
    earlier versions did) is continued with its chunks copied as they are, under its filters:
    every frame reads back as written."""
    from hpcrefine.checkpoint import CheckpointWriter, RunIdentity, RunState

    xyz = read_model(adk_case["start"]).xyz
    n = len(xyz)
    ident = RunIdentity(model="m.cif", model_sha256="0", maps={}, params={}, ranks=1, command="refine")
    for old in ("gzip", None):
        path = str(tmp_path / f"{old}.h5")
        monkeypatch.setattr(ck, "_XYZ_FILTERS", dict(compression=old, shuffle=old is not None))
        state = RunState(stage="halfset")
        state.frames = [(xyz + 0.01 * i, {"i": i}) for i in range(3)]
        w = CheckpointWriter(path, ident, {"workers": 0}, np.zeros(n), 0, time.perf_counter())
        w.write(state)
        monkeypatch.undo()
        state.frames.append((xyz + 1.0, {"i": 3}))
        w.write(state)
        with h5py.File(path, "r") as f:
            traj = f["trajectory/xyz"]
            assert traj.compression == old
            got = traj[:]
        assert got.shape == (4, n, 3)
        for i, want in enumerate([xyz, xyz + 0.01, xyz + 0.02, xyz + 1.0]):
            assert np.abs(got[i] - want).max() < 1e-4, (old, i)
    assert os.path.getsize(str(tmp_path / "None.h5")) > os.path.getsize(str(tmp_path / "gzip.h5"))


def test_workers_holding_boxes_resume_to_the_same_model(adk_case, tmp_path):
    """Workers that hold the restraints and the start in boxes (shared layout,
    whole_model_on_workers = false, decomposition "boxes": each task's start made whole again
    from the workers' parts, distributed.BoxedCoordinates, each task's minimisations chained on the
    parts, distributed.chained_minimise, and the final stage's minimisations kept as parts,
    RankMinimiser), stopped by SIGUSR1 to every rank in the half-set stage and, in another run,
    in the final stage (whose continued run replays the macro-cycle's minimisations as whole
    models), continue to the model of the run never stopped."""
    params = tmp_path / "boxes.toml"
    params.write_text('[refine]\nhalfset_layout = "shared"\ncycle_rotamers = false\n'
                      'whole_model_on_workers = false\ndecomposition = "boxes"\n')
    plain = tmp_path / "plain"
    p = subprocess.run(refine_cmd(adk_case, plain, 3, "--params", str(params)), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "each holds the restraints of its box" in (plain / "refine.log").read_text()
    for stage, steps in (("halfset", 2), ("final", 12)):
        out = tmp_path / stage
        cmd = refine_cmd(adk_case, out, 3, "--params", str(params), "--resume")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for_stage(out / ck.NAME, stage, min_steps=steps)
        for pid in ranks_of(out):
            os.kill(pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == ck.INTERRUPTED_EXIT, err[-2000:]
        meta = ck.read_meta(str(out / ck.NAME))
        assert meta["status"] == "interrupted"
        assert meta["state_stage"] == stage or (stage, meta["state_stage"]) == ("halfset", "final")
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-2000:]
        assert np.array_equal(coords(out), coords(plain)), stage


def test_a_continued_run_keeps_the_layout_it_chose(adk_case, tmp_path):
    """halfset_layout "auto" chose the shared layout for want of memory (worker_memory_gb); the
    run, stopped in the half sets and continued where memory is plentiful (a requeued job on
    another node), keeps the layout its checkpoint records and ends where the run never stopped
    ends. worker_memory_gb may change in a restart."""
    params = tmp_path / "tight.toml"
    params.write_text("[refine]\ncycle_rotamers = false\nworker_memory_gb = 0.01\n")
    plain = tmp_path / "plain"
    p = subprocess.run(refine_cmd(adk_case, plain, 3, "--params", str(params)), capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    out = tmp_path / "stopped"
    cmd = refine_cmd(adk_case, out, 3, "--params", str(params), "--resume")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_stage(out / ck.NAME, "halfset", min_steps=2)
    for pid in ranks_of(out):
        os.kill(pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == ck.INTERRUPTED_EXIT, err[-2000:]
    assert ck.read_meta(str(out / ck.NAME))["layout_choice"] == {"halfset_layout": "shared",
                                                                 "whole_model_on_workers": False}
    params.write_text("[refine]\ncycle_rotamers = false\nworker_memory_gb = 64\n")
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    log = (out / "refine.log").read_text()
    assert ("half-set layout: shared, whole_model_on_workers = false (halfset_layout auto: as chosen "
            "when the run began (checkpoint))") in log
    assert np.array_equal(coords(out), coords(plain))
