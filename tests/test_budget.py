"""parallel.budget: the memory a worker may use, and the half-set layout "auto" chooses from it."""
from __future__ import annotations

import pytest

from hpcrefine.params import build_params
from hpcrefine.errors import InputError
from hpcrefine.parallel import budget
from hpcrefine.parallel.budget import MB, GB, choose_layout, estimates


class FakeWorld:
    """A world of `size` ranks for the decisions that do not measure (worker_memory_gb > 0)."""

    def __init__(self, size):
        self.size = size

    def Get_size(self):
        return self.size


def test_estimates_follow_the_measured_peaks():
    # scripts/bench_scale.py at 1,000,020 atoms and a 480^3 map (README, Scale: memory per
    # worker): parallel-layout workers 2,892-2,905 MB, workers holding boxes 1,065-1,071 MB with 2
    # workers (the whole protocol) and 432-437 MB with 8, the master 4,070-4,192 MB; each
    # estimate at most 15 % below and 25 % above
    n, v = 1_000_020, 480 ** 3
    for got, measured in ((estimates(n, v, 2, True).parallel, 2905), (estimates(n, v, 2, True).shared, 1071),
                          (estimates(n, v, 8, True).shared, 437), (estimates(n, v, 2, True).master, 4192)):
        assert 0.85 * measured <= got / MB <= 1.25 * measured, (got / MB, measured)
    # a worker holding boxes falls with the workers; one of the parallel layout does not
    assert [estimates(n, v, w, True).shared for w in (1, 2, 4, 8)] == \
        sorted([estimates(n, v, w, True).shared for w in (1, 2, 4, 8)], reverse=True)
    assert estimates(n, v, 2, True).parallel == estimates(n, v, 64, True).parallel
    # workers that cannot hold parts (NCS, protocol steps) also hold the whole restraints
    assert estimates(n, v, 4, False).shared > estimates(n, v, 4, True).shared


def test_auto_keeps_the_parallel_layout_while_it_fits_and_shares_the_tasks_when_not():
    n, v = 1_000_020, 480 ** 3
    roomy = build_params(3.5, overrides={"worker_memory_gb": 8.0})
    c = choose_layout(roomy, n, v, FakeWorld(3), True)
    assert (c.halfset_layout, c.whole_model_on_workers, c.warning) == ("parallel", True, None)
    assert c.budget_bytes == 8 * GB and "fits" in c.reason
    tight = build_params(3.5, overrides={"worker_memory_gb": 2.0})
    c = choose_layout(tight, n, v, FakeWorld(3), True)
    assert (c.halfset_layout, c.whole_model_on_workers, c.warning) == ("shared", False, None)
    assert c.to_dict()["estimated_peak_mb"]["shared"] < 0.85 * 2048 < c.to_dict()["estimated_peak_mb"]["parallel"]
    # too little even for the shared layout: still shared, with a warning naming the way out
    c = choose_layout(build_params(3.5, overrides={"worker_memory_gb": 0.5}), n, v, FakeWorld(3), True)
    assert c.halfset_layout == "shared" and "more workers" in c.warning
    # with 64 workers the same 0.5 GB suffices for the shared layout
    assert choose_layout(build_params(3.5, overrides={"worker_memory_gb": 0.5}), n, v, FakeWorld(65),
                         True).warning is None
    # a layout given is kept, with a warning when the parallel one may not fit
    given = build_params(3.5, overrides={"worker_memory_gb": 2.0, "halfset_layout": "parallel"})
    c = choose_layout(given, n, v, FakeWorld(3), True)
    assert c.halfset_layout == "parallel" and 'halfset_layout = "auto"' in c.warning
    # one worker: nothing to choose; a checkpoint's choice is kept whatever the memory now
    assert choose_layout(tight, n, v, FakeWorld(2), True).halfset_layout == "parallel"
    stored = {"halfset_layout": "shared", "whole_model_on_workers": False}
    c = choose_layout(roomy, n, v, FakeWorld(3), True, stored)
    assert (c.halfset_layout, c.whole_model_on_workers) == ("shared", False) and "checkpoint" in c.reason


def test_layout_parameters_are_checked():
    assert build_params(3.5).halfset_layout == "auto"
    assert build_params(3.5).worker_memory_gb == 0.0
    with pytest.raises(InputError, match="worker_memory_gb must be >= 0"):
        build_params(3.5, overrides={"worker_memory_gb": -1})
    with pytest.raises(InputError, match="worker_memory_gb must be >= 0"):
        build_params(3.5, overrides={"worker_memory_gb": "lots"})


def fake_cgroup(tmp_path, name: str, proc_line: str, folder: str, files: dict):
    """A /proc/self/cgroup of one line and the cgroup folder's files under tmp_path/name; the
    paths to pass to budget.cgroup_room."""
    root = tmp_path / name
    (root / folder).mkdir(parents=True)
    for f, value in files.items():
        (root / folder / f).write_text(f"{value}\n")
    proc = tmp_path / f"{name}.proc"
    proc.write_text(proc_line + "\n")
    return str(proc), str(root)


def test_cgroup_limits_are_read_from_v2_and_v1(tmp_path):
    v2 = fake_cgroup(tmp_path, "v2", "0::/slurm/job_7", "slurm/job_7",
                     {"memory.max": 8 * GB, "memory.current": 3 * GB})
    assert budget.cgroup_room(*v2) == 5 * GB
    (tmp_path / "v2/slurm/job_7/memory.max").write_text("max\n")
    assert budget.cgroup_room(*v2) is None
    v1 = fake_cgroup(tmp_path, "v1", "5:cpuset:/job_8\n4:memory:/job_8", "memory/job_8",
                     {"memory.limit_in_bytes": 4 * GB, "memory.usage_in_bytes": 1 * GB})
    assert budget.cgroup_room(*v1) == 3 * GB
    (tmp_path / "v1/memory/job_8/memory.limit_in_bytes").write_text(f"{1 << 62}\n")   # v1's no limit
    assert budget.cgroup_room(*v1) is None
    assert budget.cgroup_room(str(tmp_path / "absent"), v1[1]) is None
    # this machine: at most what the kernel reports as available
    here = budget.available_bytes()
    assert here is not None and 0 < here <= budget.meminfo_available()


def test_a_slurm_jobs_memory_request_is_read():
    assert budget.slurm_node_bytes({"SLURM_MEM_PER_NODE": "16000"}) == 16000 * MB
    assert budget.slurm_node_bytes({"SLURM_MEM_PER_CPU": "2000", "SLURM_CPUS_ON_NODE": "8"}) == 16000 * MB
    assert budget.slurm_node_bytes({"SLURM_MEM_PER_CPU": "2000"}) is None
    assert budget.slurm_node_bytes({}) is None

