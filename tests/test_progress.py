"""Progress of a refinement: one line per step in the log, a bar on a terminal only."""
from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import time

import numpy as np

from hpcrefine.progress import (BAR_ENV, BAR_SECONDS, BAR_SECONDS_ENV, Progress, StepFigures, bar_seconds,
                                bar_wanted, format_line)

LINE = re.compile(r"progress stage=(\w+) step=(\d+)(?:/(\d+)(\+)?)? \(([^)]*)\)(.*)$")


def progress_lines(text: str) -> list[tuple]:
    """(stage, k, n, within, label, {field: value}) of every progress line."""
    out = []
    for line in text.splitlines():
        m = LINE.search(line)
        if m:
            fields = dict(kv.split("=", 1) for kv in m.group(6).split())
            out.append((m.group(1), int(m.group(2)), int(m.group(3)) if m.group(3) else None,
                        bool(m.group(4)), m.group(5), fields))
    return out


def test_format_line_and_eta():
    p = Progress(None, stream=io.StringIO(), interactive=False, logger=logging.getLogger("t"))
    p.stage("final", 4)
    p.t_stage -= 10.0                       # the stage began 10 s ago: one unit done in 10 s
    line = p.step("cycle 1 minimise", target=-5.0, bond_rmsd=0.01, angle_rmsd=1.2, iterations=7)
    f = progress_lines(line)[0]
    assert f[:5] == ("final", 1, 4, False, "cycle 1 minimise")
    assert f[5]["target"] == "-5" and f[5]["bonds"] == "0.0100" and f[5]["iterations"] == "7"
    assert abs(float(f[5]["eta"].rstrip("s")) - 30.0) < 0.5       # 3 units left at 10 s each
    trial = progress_lines(p.step("cycle 2 weight trial", unit=False))[0]
    assert trial[1:4] == (2, 4, True)                              # within unit 2 of 4
    assert "clashes" not in format_line("s", "1", "", {"clashes": None}, 1.0, 2.0, None)


def test_bar_text_estimates_the_step_in_flight():
    p = Progress(None, stream=io.StringIO(), interactive=False)
    p.stage("halfset", 8)
    t0 = p.t_stage
    p.done, p.t_unit = 2, t0 + 4.0            # 2 tasks in 4 s
    text = p.bar_text(now=t0 + 5.0)           # half-way through the third
    assert "2/8" in text and " 31%" in text and "eta 11.0s" in text
    assert "\r" not in text


def test_bar_wanted():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    assert bar_wanted(Tty(), {}) and not bar_wanted(io.StringIO(), {})
    assert bar_wanted(io.StringIO(), {BAR_ENV: "1"}) and not bar_wanted(Tty(), {BAR_ENV: "0"})


def test_step_figures(adk_case):
    from hpcrefine.refine import load_inputs

    inp = load_inputs(adk_case["start"], adk_case["full"], None, None, [], True)
    g = inp.map
    fig = StepFigures(inp.restraints, inp.data, g.origin, g.voxel)
    from hpcrefine.core.geometry import bond_lengths
    start = fig(inp.model.xyz)
    d = bond_lengths(inp.model.xyz, inp.restraints.bond_idx) - inp.restraints.bond_target
    assert abs(start["bond_rmsd"] - np.sqrt(np.mean(d * d))) < 1e-12
    from hpcrefine.modelio import read_model
    truth = fig(read_model(adk_case["truth"]).xyz)
    # the true model sits higher in its map than the shaken start, with ideal-like geometry
    assert truth["fit"] > start["fit"] + 0.5 and truth["bond_rmsd"] < 0.05 < start["bond_rmsd"]
    t0 = time.perf_counter()
    for _ in range(10):
        fig(inp.model.xyz)
    assert (time.perf_counter() - t0) / 10 < 0.01          # well under a step's time on adk


def test_log_has_one_line_per_step(adk_refined):
    log = (adk_refined / "refine.log").read_text()
    report = json.loads((adk_refined / "report.json").read_text())
    assert "\r" not in log
    lines = progress_lines(log)
    assert len(lines) == report["progress"]["steps"]
    half = [x for x in lines if x[0] == "halfset"]
    assert [(x[1], x[2]) for x in half] == [(k, 8) for k in range(1, 9)]
    final = [x for x in lines if x[0] == "final"]
    cycles, trials = [x for x in final if not x[3]], [x for x in final if x[3]]
    n = report["parameters"]["macro_cycles"]
    assert [(x[1], x[2]) for x in cycles] == [(k, n) for k in range(1, n + 1)]
    assert len(trials) == sum(len(c["weight_trials"]) for c in report["cycles"])
    for stage, k, total, within, label, f in lines:
        for key in ("bonds", "angles", "fit", "time", "elapsed"):
            assert key in f, (label, key)
        if stage == "final":
            assert "target" in f and "iterations" in f
        if not within:
            assert "eta" in f
    for x, c in zip(cycles, report["cycles"]):
        assert abs(float(x[5]["bonds"]) - c["bond_rmsd"]) < 1e-4 and "clashes" in x[5]
        assert int(x[5]["iterations"]) == c["iterations"]
    # the fit figure costs under 2% of the steps' time
    t = report["timings"]
    steps_seconds = sum(t[k]["seconds"] for k in ("half sets", "weight", "minimise") if k in t)
    assert report["progress"]["figure_seconds"] < 0.02 * steps_seconds


def _run(adk_case, out, stdout, stderr, env):
    cmd = [sys.executable, "-m", "hpcrefine.cli", "refine", adk_case["start"], "--map",
           adk_case["full"], "--resolution", "3.5", "--cycles", "2", "--protocol", "minimise,adp",
           "--output", str(out)]
    return subprocess.run(cmd, stdout=stdout, stderr=stderr, env=env, timeout=600)


def _env():
    env = dict(os.environ)
    env.pop(BAR_ENV, None)
    # a whole adk run takes 2-3 s on an idle machine, its final and protocol stages under 1 s:
    # redraw often enough that the bar shows between the log lines
    env[BAR_SECONDS_ENV] = "0.05"
    return env


def test_bar_on_a_terminal_only(adk_case, tmp_path):
    master, slave = pty.openpty()
    chunks = []
    with open(tmp_path / "stdout", "wb") as so:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hpcrefine.cli", "refine", adk_case["start"], "--map",
             adk_case["full"], "--resolution", "3.5", "--cycles", "2", "--protocol",
             "minimise,adp", "--output", str(tmp_path / "tty")],
            stdout=so, stderr=slave, env=_env())
        os.close(slave)
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:            # the terminal closes when the run ends
                break
            if not data:
                break
            chunks.append(data)
        assert proc.wait(timeout=600) == 0
    os.close(master)
    terminal = b"".join(chunks).decode(errors="replace")
    bars = re.findall(r"\r\x1b\[K([^\r\n]+)", terminal)
    # redrawn every 0.05 s here (HPCREFINE_BAR_SECONDS): the final and protocol stages show
    assert bars and all(re.match(r"(final|protocol) .*\[[#-]+\] +\d+% \d/\d", b) for b in bars), bars
    log = (tmp_path / "tty" / "refine.log").read_text()
    stdout = (tmp_path / "stdout").read_text()
    assert "\r" not in log and "\r" not in stdout
    stages = [(x[0], x[4]) for x in progress_lines(log)]
    assert ("protocol", "adp") in stages and sum(s == "final" for s, _ in stages) >= 2


def test_no_carriage_return_without_terminal(adk_case, tmp_path):
    res = _run(adk_case, tmp_path / "plain", subprocess.PIPE, subprocess.PIPE, _env())
    assert res.returncode == 0, res.stderr.decode()[-2000:]
    log = (tmp_path / "plain" / "refine.log").read_text()
    for text in (res.stdout.decode(), res.stderr.decode(), log):
        assert "\r" not in text and "\x1b[" not in text
    assert len(progress_lines(log)) == json.loads((tmp_path / "plain" / "report.json").read_text())[
        "progress"]["steps"] > 0
    assert json.loads((tmp_path / "plain" / "report.json").read_text())["progress"]["bar"] is False


def test_bar_interval_from_the_environment():
    assert bar_seconds({}) == BAR_SECONDS
    assert bar_seconds({BAR_SECONDS_ENV: "0.05"}) == 0.05
    assert bar_seconds({BAR_SECONDS_ENV: "fast"}) == BAR_SECONDS
    assert bar_seconds({BAR_SECONDS_ENV: "-1"}) == BAR_SECONDS
