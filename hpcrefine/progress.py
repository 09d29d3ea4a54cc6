"""Progress of a refinement: one uniform log line per step and, on a terminal, a bar.

Every step (a half-set task, a weight trial or macro-cycle minimisation, a protocol step) ends
with one line from the master:

    progress stage=final step=3/5 (cycle 2 minimise, weight 1.234) target=-1523.4 bonds=0.0121
    angles=1.41 clashes=3 fit=1.82 iterations=88 time=0.8s elapsed=12.4s eta=30s

`fit` is the map value at the atom centres in standard deviations of the map, averaged over the
atoms (StepFigures): one interpolation per atom, no model map. `step=k/n` counts the units of a
stage whose number is known in advance (half-set tasks, macro-cycles, protocol steps); a weight
trial is a step within its macro-cycle (`step=2/5+`). `eta` is the stage's elapsed time per unit
done times the units left.

When stderr is a terminal, a bar is redrawn in place (carriage return) on stderr by a thread that
sleeps between redraws (so the master, which only waits while the workers minimise, stays idle);
it estimates the step in flight from the mean time of the stage's units so far, and is cleared
before every log record. Without a terminal (batch logs, SLURM) there is no bar and no thread,
and log files never receive a carriage return. mpiexec connects the ranks to pipes, not to the
terminal: there HPCREFINE_BAR=1 asks for the bar, drawn on stdout with the log lines
(HPCREFINE_BAR=0 turns it off anywhere).
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time

import numpy as np

from .core import geometry
from .core.density import map_mean_std, tricubic

log = logging.getLogger(__name__)

BAR_SECONDS = 0.5          # redraw interval of the bar
BAR_WIDTH = 24
BAR_ENV = "HPCREFINE_BAR"  # 1: draw the bar even without a terminal (under mpiexec), 0: never
BAR_SECONDS_ENV = "HPCREFINE_BAR_SECONDS"   # another redraw interval (s), e.g. 0.05 for a short run


def bar_seconds(environ=None) -> float:
    """The bar's redraw interval: HPCREFINE_BAR_SECONDS when it is a positive number, else
    BAR_SECONDS."""
    text = (os.environ if environ is None else environ).get(BAR_SECONDS_ENV, "").strip()
    try:
        value = float(text)
    except ValueError:
        return BAR_SECONDS
    return value if value > 0 else BAR_SECONDS


class StepFigures:
    """Cheap figures of a model, O(atoms + restraints): bond and angle rmsd against the ideal
    values and the fit, the mean map value at the atom centres in map standard deviations
    (the map's mean and sd computed once, here)."""

    def __init__(self, restraints, data=None, origin=None, voxel=None):
        self.r = restraints
        self.data = None
        if data is not None:
            self.data, self.origin, self.voxel = data, origin, voxel
            self.mean, self.sd = map_mean_std(data)

    def __call__(self, xyz: np.ndarray) -> dict:
        r = self.r
        xyz = np.ascontiguousarray(xyz, dtype=np.float64)
        out = {}
        if len(r.bond_idx):
            db = geometry.bond_lengths(xyz, r.bond_idx) - r.bond_target
            out["bond_rmsd"] = float(np.sqrt(np.mean(db * db)))
        if len(r.angle_idx):
            da = geometry.angle_values(xyz, r.angle_idx) - r.angle_target
            out["angle_rmsd"] = float(np.sqrt(np.mean(da * da)))
        if self.data is not None:
            values, _ = tricubic(self.data, self.origin, self.voxel, xyz)
            out["fit"] = float((np.mean(values) - self.mean) / self.sd) if self.sd > 0 else 0.0
        return out


def _seconds(s: float) -> str:
    s = max(0.0, s)
    if s < 600:
        return f"{s:.1f}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def format_line(stage: str, step: str, label: str, figures: dict, seconds: float, elapsed: float,
                eta: float | None) -> str:
    """The progress line (see the module docstring); absent figures are left out."""
    parts = [f"progress stage={stage} step={step}" + (f" ({label})" if label else "")]
    for key, name, fmt in (("target", "target", "{:.4g}"), ("bond_rmsd", "bonds", "{:.4f}"),
                           ("angle_rmsd", "angles", "{:.2f}"), ("clashes", "clashes", "{:d}"),
                           ("fit", "fit", "{:.3f}"), ("iterations", "iterations", "{:d}")):
        if figures.get(key) is not None:
            parts.append(f"{name}=" + fmt.format(figures[key]))
    parts.append(f"time={_seconds(seconds)} elapsed={_seconds(elapsed)}")
    if eta is not None:
        parts.append(f"eta={_seconds(eta)}")
    return " ".join(parts)


class Progress:
    """The master's record of steps: stage(name, units) opens a stage of a known (or None)
    number of units; step(...) logs one step's line, unit=True when the step completes a unit.
    With interactive=True (default: bar_wanted), start() begins drawing the bar on `stream`."""

    def __init__(self, figures: StepFigures | None, stream=None, interactive: bool | None = None,
                 logger: logging.Logger = log):
        self.figures = figures
        if stream is None:
            # asked for by HPCREFINE_BAR=1 (mpiexec: pipes), on the log's stream, stdout, so that
            # the bar's clearing and the log lines pass through mpiexec's one pipe in order
            stream = sys.stdout if os.environ.get(BAR_ENV, "").strip() == "1" else sys.stderr
        self.stream = stream
        self.interactive = bar_wanted(self.stream) if interactive is None else interactive
        self.log = logger
        self.t_run = time.monotonic()
        self.name = ""
        self.units = None
        self.done = 0
        self.n_steps = 0
        self.t_stage = self.t_step = self.t_unit = self.t_run
        self.current = ""
        self.figure_seconds = 0.0     # time spent in StepFigures (its cost per step)
        self.total_steps = 0
        self._lock = threading.Lock()
        self._drawn = False
        self._hold_until = 0.0
        self._stop = threading.Event()
        self._thread = None
        self._filter = None

    def start(self) -> "Progress":
        """Start the bar when interactive: its thread, and the clearing before each log record
        (a filter on the root logger's handlers). Returns self; close() ends it."""
        if self.interactive and self._thread is None:
            self._filter = _ClearBar(self)
            for h in logging.getLogger().handlers:
                h.addFilter(self._filter)
            self._thread = threading.Thread(target=self._run, name="progress-bar", daemon=True)
            self._thread.start()
        return self

    # --------------------------------------------------------------------- steps and lines
    def stage(self, name: str, units: int | None = None, done: int = 0) -> None:
        with self._lock:
            self.name, self.units, self.done, self.n_steps = name, units, done, 0
            self.t_stage = self.t_step = self.t_unit = time.monotonic()
            self.current = ""

    def begin(self, label: str) -> None:
        """The step now running (shown by the bar)."""
        with self._lock:
            self.current = label
            self.t_step = time.monotonic()

    def step(self, label: str, xyz=None, unit: bool = True, seconds: float | None = None,
             **figures) -> str:
        """Log the line of a finished step; figures: target, iterations, clashes, ... and any
        of StepFigures' keys already known (those are not computed again)."""
        if xyz is not None and self.figures is not None:
            t0 = time.perf_counter()
            for k, v in self.figures(xyz).items():
                figures.setdefault(k, v)
            self.figure_seconds += time.perf_counter() - t0
        now = time.monotonic()
        with self._lock:
            self.n_steps += 1
            self.total_steps += 1
            if unit:
                self.done += 1
                self.t_unit = now
            if self.units is None:
                step = f"{self.n_steps}"
            else:
                step = f"{self.done}/{self.units}" if unit else f"{self.done + 1}/{self.units}+"
            eta = None
            if self.units is not None and self.done > 0:
                eta = (now - self.t_stage) / self.done * (self.units - self.done)
            took = now - self.t_step if seconds is None else seconds
            line = format_line(self.name, step, label, figures, took, now - self.t_run, eta)
            self.t_step = now
            self.current = ""
        self.log.info("%s", line)
        return line

    def as_dict(self) -> dict:
        """The run report's record: steps logged and the seconds their figures took."""
        return {"steps": self.total_steps, "figure_seconds": round(self.figure_seconds, 4),
                "bar": self.interactive}

    # ------------------------------------------------------------------------------ bar
    def bar_text(self, now: float | None = None) -> str:
        """The bar's text at time now (no carriage return)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            head = f"{self.name}" + (f" {self.current}" if self.current else "")
            if self.units:
                frac = self.done / self.units
                if self.done > 0:           # the unit in flight, from the mean unit so far
                    mean = (self.t_unit - self.t_stage) / self.done
                    frac += min((now - self.t_unit) / mean, 0.99) / self.units if mean > 0 else 0.0
                frac = min(frac, 1.0)
                n = int(round(frac * BAR_WIDTH))
                bar = f"[{'#' * n}{'-' * (BAR_WIDTH - n)}] {100 * frac:3.0f}% {self.done}/{self.units}"
                if self.done > 0:
                    mean = (self.t_unit - self.t_stage) / self.done
                    left = max(mean * (self.units - self.done) - (now - self.t_unit), 0.0)
                    bar += f" eta {_seconds(left)}"
            else:
                bar = f"[step {self.n_steps + 1}]"
            return f"{head} {bar} elapsed {_seconds(now - self.t_run)}"

    def draw(self) -> None:
        text = self.bar_text()
        with self._lock:
            if time.monotonic() < self._hold_until:     # a log record is being written
                return
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._drawn = True

    def clear(self, hold: float = 0.0) -> None:
        """Erase the bar; with hold, do not redraw it for that many seconds."""
        with self._lock:
            self._hold_until = time.monotonic() + hold
            if self._drawn:
                self.stream.write("\r\033[K")
                self.stream.flush()
                self._drawn = False

    def _run(self) -> None:
        interval = bar_seconds()
        while not self._stop.wait(interval):
            if self.name:
                self.draw()

    def close(self) -> None:
        """Stop the bar (idempotent) and clear it from the terminal."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self.clear()
            for h in logging.getLogger().handlers:
                h.removeFilter(self._filter)


class _ClearBar(logging.Filter):
    """Clears the bar before a log record reaches a handler (so lines never follow the bar)."""

    def __init__(self, progress: Progress):
        super().__init__()
        self.progress = progress

    def filter(self, record) -> bool:
        self.progress.clear(hold=0.1)       # the handler writes the record right after this
        return True


def bar_wanted(stream, environ=None) -> bool:
    """Whether to draw the bar on stream: HPCREFINE_BAR=1 or 0 decides (mpiexec gives the ranks
    pipes, not the terminal, so under mpiexec the bar is asked for this way), else whether the
    stream is a terminal."""
    env = (os.environ if environ is None else environ).get(BAR_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
