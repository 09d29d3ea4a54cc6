"""L-BFGS: convergence, step limits, determinism and exact restarts."""
import numpy as np
import pytest

from hpcrefine.core.lbfgs import LBFGSState, lbfgs


def rosenbrock(x):
    f = 100.0 * (x[1] - x[0] ** 2) ** 2 + (1.0 - x[0]) ** 2
    g = np.array([-400.0 * x[0] * (x[1] - x[0] ** 2) - 2.0 * (1.0 - x[0]),
                  200.0 * (x[1] - x[0] ** 2)])
    return f, g


def quadratic(n=60, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, n))
    a = q @ q.T / n + 0.1 * np.eye(n)
    b = rng.normal(size=n)
    return (lambda x: (0.5 * x @ a @ x - b @ x, a @ x - b)), np.linalg.solve(a, b)


def quartic(n=90, seed=1):
    """A non-quadratic test function on 30 'atoms' (n = 90 coordinates)."""
    fq, _ = quadratic(n, seed)

    def fun(x):
        f, g = fq(x)
        return f + 0.01 * np.sum(x**4), g + 0.04 * x**3
    return fun


@pytest.mark.parametrize("max_step", [None, 0.5])
def test_rosenbrock(max_step):
    x, f, state, info = lbfgs(rosenbrock, [-1.2, 1.0], maxiter=200, point_dim=1,
                              max_step=max_step, gtol=1e-8)
    np.testing.assert_allclose(x, [1.0, 1.0], atol=1e-5)
    assert f < 1e-10
    assert info["status"] in ("gtol", "ftol")
    assert state.iteration == info["iterations"] < 100
    assert state.n_evals == info["n_evals"]


def test_random_quadratic():
    fun, xstar = quadratic()
    x, f, state, info = lbfgs(fun, np.zeros(60), maxiter=500, gtol=1e-7, ftol=0.0)
    assert info["status"] == "gtol"
    np.testing.assert_allclose(x, xstar, atol=1e-5)
    assert np.abs(fun(x)[1]).max() <= 1e-7


def test_step_limits():
    """No trial moves a point by more than max_step from the iteration's start point; the first
    trial moves the points by first_step A rms."""
    fun = quartic()
    x0 = np.random.default_rng(2).normal(size=90) * 3
    start = [x0.copy()]
    disp = []

    def recording(x):
        d = np.linalg.norm((x - start[-1]).reshape(-1, 3), axis=1)
        disp.append((d.max(), np.sqrt(np.mean(d * d))))
        return fun(x)

    def cb(it, x, f):
        start.append(x.copy())          # the next iteration starts here
        return False

    _, _, state, _ = lbfgs(recording, x0, maxiter=25, max_step=0.3, first_step=0.1, callback=cb,
                           gtol=0, ftol=0)
    assert state.iteration == 25
    assert disp[1][1] == pytest.approx(0.1)         # disp[0] is the start point itself
    assert max(d for d, _ in disp) <= 0.3 * (1 + 1e-12)
    assert max(d for d, _ in disp) > 0.29           # the limit was active


def test_deterministic_and_restart_bitwise():
    fun = quartic()
    x0 = np.random.default_rng(3).normal(size=90)
    x_a, f_a, s_a, info_a = lbfgs(fun, x0, maxiter=30, gtol=0, ftol=0)
    assert info_a["status"] == "maxiter" and s_a.iteration == 30
    x_b, f_b, _, _ = lbfgs(fun, x0, maxiter=30, gtol=0, ftol=0)
    assert np.array_equal(x_a, x_b) and f_a == f_b

    seen = []

    def stop_at_12(it, x, f):
        seen.append(it)
        return it == 12

    x_c, f_c, s_c, info_c = lbfgs(fun, x0, maxiter=30, gtol=0, ftol=0, callback=stop_at_12)
    assert info_c["status"] == "callback" and s_c.iteration == 12 and seen == list(range(1, 13))
    # round trip through plain arrays (as a checkpoint file would store them)
    saved = {k: np.array(v, copy=True) for k, v in s_c.to_arrays().items()}
    restored = LBFGSState.from_arrays(saved)
    x_d, f_d, s_d, info_d = lbfgs(fun, None, maxiter=30, gtol=0, ftol=0, state=restored)
    assert info_d["status"] == "maxiter" and s_d.iteration == 30
    assert np.array_equal(x_d, x_a) and f_d == f_a
    assert s_d.n_evals == s_a.n_evals
    for k, v in s_a.to_arrays().items():
        assert np.array_equal(v, s_d.to_arrays()[k]), k


def test_callback_gets_read_only_x_and_state_checks():
    fun, _ = quadratic(n=30)
    with pytest.raises(ValueError):
        def cb(it, x, f):
            x[0] = 1.0
        lbfgs(fun, np.zeros(30), maxiter=3, callback=cb)
    _, _, state, _ = lbfgs(fun, np.zeros(30), maxiter=2, m=5)
    with pytest.raises(ValueError):
        lbfgs(fun, None, maxiter=4, m=7, state=state)
    with pytest.raises(ValueError):
        lbfgs(rosenbrock, [0.0, 0.0], maxiter=3)            # 2 is not a multiple of point_dim=3


def test_already_converged_start():
    fun, xstar = quadratic(n=30)
    x, f, state, info = lbfgs(fun, xstar, maxiter=10, gtol=1e-6)
    assert info["status"] == "gtol" and state.iteration == 0 and state.n_evals == 1
