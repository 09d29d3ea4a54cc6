#!/usr/bin/env python
"""Checkpoint size and write time for the 1,000,020-atom dengue assembly (7cth, 60 operators).

    python scripts/bench_checkpoint.py [--workdir DIR] [--out DIR]

Builds (once, cached) the assembly as scripts/bench_validate.py does, then writes the checkpoint a
half-set run of it holds in the middle of its final refinement: the 8 half-set tasks (4 weights x
2 halves: FSC curves, geometry, float64 coordinates), the coordinates of the macro-cycle in
progress and 3 finished minimisations of it (float64), and a trajectory of 1 + 8 + 2 frames
(float32, gzip). It times the first write (every frame new) and a second write (the old frames
copied chunk by chunk, one new frame), prints file sizes, times and the overhead as a fraction of
the default checkpoint interval (120 s), and reads the file back to check it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))


def main() -> int:
    import numpy as np

    from bench_validate import build_assembly
    from hpcrefine import checkpoint as ck
    from hpcrefine.modelio import read_model
    from hpcrefine.params import build_params

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default=os.environ.get("HPCREFINE_DATA") or os.path.expanduser("~/.cache/hpcrefine"))
    ap.add_argument("--out", default="bench_checkpoint")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = build_assembly(args.workdir)
    t0 = time.perf_counter()
    model = read_model(path)
    n = model.n_atoms
    print(f"{path}: {n} atoms, read in {time.perf_counter() - t0:.1f} s")
    rng = np.random.default_rng(0)
    xyz = model.xyz

    def moved(scale):
        return xyz + rng.normal(scale=scale, size=xyz.shape)
    n_shells = 200
    state = ck.RunState(stage="final", cycle=2, xyz=moved(0.3), weight=12.0, w_half=13.0,
                        halfset={"final_weight": 13.0, "nearest_weight_tried": 6.5, "weights_tried": []})
    for h in (1, 2):
        for k in range(4):
            state.tasks[(h, k)] = np.concatenate([rng.random(2 * n_shells + 2), moved(0.4).ravel()])
    state.calls = [ck.CallRecord(moved(0.3), -1e6, 60, 70, 30.0) for _ in range(3)]
    state.frames = [(xyz, {"stage": "start"})] + [
        (state.tasks[(h, k)][2 * n_shells + 2:].reshape(n, 3), {"stage": "halfset", "half": h, "weight_index": k})
        for h in (1, 2) for k in range(4)] + [(moved(0.3), {"stage": "final", "cycle": c}) for c in (1, 2)]
    params = build_params(3.5)
    ident = ck.RunIdentity(path, "0" * 64, {}, params.to_dict(), 3, "bench", "")
    target = os.path.join(args.out, ck.NAME)
    w = ck.CheckpointWriter(target, ident, {"workers": 2, "block_bounds": [0, n // 2, n]}, model.b, 0,
                            time.perf_counter())
    rows = []
    for label in ("first write (11 new frames)", "next write (11 frames copied, 1 new)"):
        t1 = time.perf_counter()
        w.write(state)
        dt = time.perf_counter() - t1
        rows.append((label, dt, os.path.getsize(target)))
        state.frames.append((moved(0.3), {"stage": "final", "cycle": 3}))
    st = ck.load_state(target, n)
    assert np.array_equal(st.xyz, state.xyz) and len(st.tasks) == 8 and len(st.calls) == 3
    print(f"checkpoint of {n} atoms: 8 half-set tasks, 3 minimisations, trajectory frames")
    for label, dt, size in rows:
        print(f"  {label:40s} {dt:6.2f} s  {size / 1e6:8.1f} MB  ({100 * dt / 120:.2f}% of a 120 s interval)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
