"""L-BFGS minimisation with a strong-Wolfe line search and an exactly restorable state.

The iteration is a pure function of the values fun returns: no randomness, no clocks, and all
inner products are computed by one fixed-order kernel (not BLAS, whose summation order may depend
on memory alignment or the thread count). MPI ranks that receive the same f and g therefore take
bitwise the same steps, and a run stopped by the callback and resumed from its state continues
exactly as if it had not stopped.

Steps are limited for coordinate vectors: x is read as points of `point_dim` coordinates (3 for
atoms), no line-search trial moves any point by more than `max_step` (A), and the first iteration
(empty history) starts with a trial step that moves the points by `first_step` A rms.

Line search: bracketing and zoom with safeguarded cubic interpolation (Nocedal & Wright,
algorithms 3.5 and 3.6) for the strong Wolfe conditions, c1 = 1e-4, c2 = 0.9. A step cut short by
max_step is accepted when it gives sufficient decrease. A correction pair is stored only when
s.y > 1e-10 * y.y (positive curvature).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

C1 = 1e-4
C2 = 0.9
CURV_EPS = 1e-10


@njit(cache=True)
def _dot(a, b):
    """Inner product in a fixed order (8 interleaved partial sums, then combined)."""
    n = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    m = n - n % 8
    for i in range(0, m, 8):
        s0 += a[i] * b[i]
        s1 += a[i + 1] * b[i + 1]
        s2 += a[i + 2] * b[i + 2]
        s3 += a[i + 3] * b[i + 3]
        s4 += a[i + 4] * b[i + 4]
        s5 += a[i + 5] * b[i + 5]
        s6 += a[i + 6] * b[i + 6]
        s7 += a[i + 7] * b[i + 7]
    for i in range(m, n):
        s0 += a[i] * b[i]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True)
def _two_loop(g, S, Y, rho, count, pos, alpha, d):
    """d = -H g by the two-loop recursion over the `count` newest pairs of the ring buffer."""
    m = S.shape[0]
    n = g.shape[0]
    for i in range(n):
        d[i] = -g[i]
    for c in range(count):                       # newest to oldest
        r = (pos - 1 - c) % m
        a = rho[r] * _dot(S[r], d)
        alpha[r] = a
        for i in range(n):
            d[i] -= a * Y[r, i]
    if count > 0:
        r = (pos - 1) % m
        gamma = 1.0 / (rho[r] * _dot(Y[r], Y[r]))     # s.y / y.y
        for i in range(n):
            d[i] *= gamma
    for c in range(count - 1, -1, -1):           # oldest to newest
        r = (pos - 1 - c) % m
        b = rho[r] * _dot(Y[r], d)
        a = alpha[r] - b
        for i in range(n):
            d[i] += a * S[r, i]


@njit(cache=True)
def _step(x, a, d):
    """x + a d as a new array (one pass, no temporaries)."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = x[i] + a * d[i]
    return out


@njit(cache=True)
def _curvature(x1, x0, g1, g0):
    """s.y and y.y for s = x1 - x0, y = g1 - g0, without forming s and y (fixed order)."""
    n = x1.shape[0]
    sy = np.zeros(4)
    yy = np.zeros(4)
    m = n - n % 4
    for i0 in range(0, m, 4):
        for lane in range(4):
            i = i0 + lane
            si = x1[i] - x0[i]
            yi = g1[i] - g0[i]
            sy[lane] += si * yi
            yy[lane] += yi * yi
    for i in range(m, n):
        si = x1[i] - x0[i]
        yi = g1[i] - g0[i]
        sy[0] += si * yi
        yy[0] += yi * yi
    return (sy[0] + sy[1]) + (sy[2] + sy[3]), (yy[0] + yy[1]) + (yy[2] + yy[3])


@njit(cache=True)
def _store_diff(out, a, b):
    for i in range(out.shape[0]):
        out[i] = a[i] - b[i]


@njit(cache=True)
def _absmax(g):
    mx = 0.0
    for i in range(g.shape[0]):
        v = abs(g[i])
        if v > mx or v != v:
            mx = v
    return mx


@njit(cache=True)
def _point_norms(d, dim):
    """(max, rms) over points of the Euclidean norm of each group of `dim` components."""
    mx, ss, npt = _point_sums(d, dim)
    if npt == 0:
        return 0.0, 0.0
    return math.sqrt(mx), math.sqrt(ss / npt)


def _global_sum(comm, *values) -> tuple:
    """The sums over the ranks of comm of a few scalars (one buffer Allreduce; as given when
    comm is None)."""
    if comm is None:
        return values
    from mpi4py import MPI
    buf = np.array(values, dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    return tuple(float(v) for v in buf)


def _global_max(comm, value: float) -> float:
    if comm is None:
        return value
    from mpi4py import MPI
    buf = np.array([value], dtype=np.float64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.MAX)
    return float(buf[0])


def _gdot(comm, a, b) -> float:
    return _global_sum(comm, _dot(a, b))[0]


@njit(cache=True)
def _axpy(d, a, v):
    """d += a v in place."""
    for i in range(d.shape[0]):
        d[i] += a * v[i]


def _two_loop_split(comm, g, S, Y, rho, count, pos, alpha, d):
    """_two_loop over a vector split between the ranks of comm: every inner product is summed
    over the ranks, so each rank gets its own part of d = -H g."""
    m = S.shape[0]
    np.negative(g, out=d)
    for c in range(count):
        r = (pos - 1 - c) % m
        a = rho[r] * _gdot(comm, S[r], d)
        alpha[r] = a
        _axpy(d, -a, Y[r])
    if count > 0:
        r = (pos - 1) % m
        d *= 1.0 / (rho[r] * _gdot(comm, Y[r], Y[r]))
    for c in range(count - 1, -1, -1):
        r = (pos - 1 - c) % m
        b = rho[r] * _gdot(comm, Y[r], d)
        _axpy(d, alpha[r] - b, S[r])


@njit(cache=True)
def _point_sums(d, dim):
    """(max squared norm, sum of squared norms, points) over points of `dim` components."""
    npt = d.shape[0] // dim
    mx = 0.0
    ss = 0.0
    for p in range(npt):
        s = 0.0
        for c in range(dim):
            v = d[p * dim + c]
            s += v * v
        ss += s
        if s > mx:
            mx = s
    return mx, ss, npt


def _split_point_norms(comm, d, dim):
    """_point_norms of a vector split between the ranks of comm."""
    mx, ss, npt = _point_sums(d, dim)
    mx = _global_max(comm, mx)
    ss, npt = _global_sum(comm, ss, float(npt))
    if npt == 0:
        return 0.0, 0.0
    return math.sqrt(mx), math.sqrt(ss / npt)


@dataclass
class LBFGSState:
    """Everything that determines the rest of a minimisation (with fun and the parameters).

    S, Y: (m, n) ring buffers of the correction pairs s = x_{k+1} - x_k, y = g_{k+1} - g_k;
    rho[r] = 1 / (s_r . y_r); `count` pairs are valid, `pos` is where the next one goes.
    """

    x: np.ndarray
    f: float
    g: np.ndarray
    S: np.ndarray
    Y: np.ndarray
    rho: np.ndarray
    count: int = 0
    pos: int = 0
    iteration: int = 0
    n_evals: int = 0

    @property
    def m(self) -> int:
        return self.S.shape[0]

    @classmethod
    def new(cls, x: np.ndarray, f: float, g: np.ndarray, m: int, n_evals: int = 1) -> "LBFGSState":
        n = x.shape[0]
        return cls(x=x, f=float(f), g=g, S=np.zeros((m, n)), Y=np.zeros((m, n)), rho=np.zeros(m),
                   count=0, pos=0, iteration=0, n_evals=n_evals)

    def to_arrays(self) -> dict:
        """name -> numpy array (scalars as 0-d arrays), e.g. for HDF5 datasets."""
        out = {"x": self.x, "g": self.g, "S": self.S, "Y": self.Y, "rho": self.rho,
               "f": np.array(self.f, dtype=np.float64)}
        for k in ("count", "pos", "iteration", "n_evals"):
            out[k] = np.array(getattr(self, k), dtype=np.int64)
        return out

    @classmethod
    def from_arrays(cls, a: dict) -> "LBFGSState":
        def arr(k):
            return np.array(a[k], dtype=np.float64)          # own, writable copies
        st = cls(x=arr("x"), f=float(np.asarray(a["f"])), g=arr("g"), S=arr("S"), Y=arr("Y"),
                 rho=arr("rho"), count=int(np.asarray(a["count"])), pos=int(np.asarray(a["pos"])),
                 iteration=int(np.asarray(a["iteration"])), n_evals=int(np.asarray(a["n_evals"])))
        n = st.x.shape[0]
        if st.g.shape != (n,) or st.S.shape != st.Y.shape or st.S.shape[1:] != (n,) \
                or st.rho.shape != (st.S.shape[0],) or not 0 <= st.count <= st.S.shape[0]:
            raise ValueError("inconsistent L-BFGS state arrays")
        return st

    def reset_history(self) -> None:
        self.count = 0
        self.pos = 0


def _cubic_min(a, fa, ga, b, fb, gb):
    """Minimiser of the cubic through (a, fa, ga), (b, fb, gb), or None."""
    d1 = ga + gb - 3.0 * (fa - fb) / (a - b)
    disc = d1 * d1 - ga * gb
    if not disc >= 0.0:
        return None
    d2 = math.copysign(math.sqrt(disc), b - a)
    den = gb - ga + 2.0 * d2
    if den == 0.0:
        return None
    t = b - (b - a) * (gb + d2 - d1) / den
    return t if math.isfinite(t) else None


class _LineSearch:
    """phi(a) = f(x + a d) along a descent direction d; remembers the best accepted point."""

    def __init__(self, fun, x, f0, g0, d, state, comm=None):
        self.fun, self.x, self.d, self.state, self.comm = fun, x, d, state, comm
        self.f0 = f0
        self.dphi0 = _gdot(comm, g0, d)
        self.evals = 0

    def eval(self, a):
        xt = _step(self.x, a, self.d)
        f, g = self.fun(xt)
        g = np.ascontiguousarray(g, dtype=np.float64).reshape(-1)
        self.evals += 1
        self.state.n_evals += 1
        f = float(f)
        return xt, f, g, _gdot(self.comm, g, self.d)

    def run(self, a_init, a_max, max_evals):
        """Returns (a, x, f, g) of an accepted step, or None."""
        f0, dphi0 = self.f0, self.dphi0
        a_prev, f_prev, dphi_prev = 0.0, f0, dphi0
        pt_prev = None
        a = min(a_init, a_max)
        first = True
        while self.evals < max_evals:
            xt, f, g, dphi = self.eval(a)
            pt = (a, xt, f, g)
            if not math.isfinite(f) or f > f0 + C1 * a * dphi0 or (not first and f >= f_prev):
                return self.zoom(a_prev, f_prev, dphi_prev, pt_prev, a, f, dphi, max_evals)
            if abs(dphi) <= -C2 * dphi0:
                return pt
            if dphi >= 0.0:
                return self.zoom(a, f, dphi, pt, a_prev, f_prev, dphi_prev, max_evals)
            if a >= a_max:
                return pt                       # sufficient decrease at the step limit
            a_prev, f_prev, dphi_prev, pt_prev = a, f, dphi, pt
            a = min(4.0 * a, a_max)
            first = False
        return pt_prev

    def zoom(self, lo, f_lo, dphi_lo, pt_lo, hi, f_hi, dphi_hi, max_evals):
        """Strong-Wolfe step between lo (sufficient decrease, lowest f so far) and hi."""
        while self.evals < max_evals:
            width = hi - lo
            if abs(width) <= 1e-12 * max(abs(lo), abs(hi)):
                break
            a = None
            if math.isfinite(f_hi) and math.isfinite(dphi_hi):
                a = _cubic_min(lo, f_lo, dphi_lo, hi, f_hi, dphi_hi)
            left, right = min(lo, hi), max(lo, hi)
            margin = 0.1 * (right - left)
            if a is None or not (left + margin <= a <= right - margin):
                a = lo + 0.5 * width
            xt, f, g, dphi = self.eval(a)
            if not math.isfinite(f) or f > self.f0 + C1 * a * self.dphi0 or f >= f_lo:
                hi, f_hi, dphi_hi = a, f, dphi
            else:
                pt = (a, xt, f, g)
                if abs(dphi) <= -C2 * self.dphi0:
                    return pt
                if dphi * (hi - lo) >= 0.0:
                    hi, f_hi, dphi_hi = lo, f_lo, dphi_lo
                lo, f_lo, dphi_lo, pt_lo = a, f, dphi, pt
        return pt_lo          # best point with sufficient decrease (None if there is none)


def lbfgs(fun, x0, maxiter: int, m: int = 10, gtol: float = 1e-5, ftol: float = 1e-9,
          state: LBFGSState | None = None, callback=None, max_step: float | None = 0.5,
          first_step: float = 0.1, point_dim: int = 3, max_ls: int = 20, comm=None):
    """Minimise fun from x0; returns (x, f, state, info).

    With comm (an MPI communicator of more than one rank; collective over it), the vector is
    split between its ranks: x0, fun's x and g, the state and the result are this rank's part
    (a whole number of points), f is the same on every rank, and every inner product and maximum
    is reduced over comm, so the ranks take the same steps and each keeps only its part of the
    history.
    fun(x) -> (f, g) with x a flat float64 vector. maxiter bounds state.iteration, which counts
    iterations since the state was created: resuming a stopped run with the same maxiter finishes
    the original run. With state given, x0 is ignored and the minimisation continues from the
    state (which is updated in place). Stops when max |g| <= gtol, when an iteration lowers f by
    at most ftol * max(|f|, |f_prev|, 1), at maxiter, when the line search fails twice in a row
    (the second time from a reset history), or when callback(iteration, x, f) returns True (x is
    read-only). The callback runs after every iteration except one that ends the run by ftol, so
    that a run stopped by the callback and resumed is the same as one never stopped.
    max_step=None removes the step limit.

    info: {'status': 'gtol' | 'ftol' | 'maxiter' | 'callback' | 'linesearch', 'iterations',
    'n_evals'}.
    """
    if m < 1:
        raise ValueError("m must be >= 1")
    if comm is not None and comm.Get_size() == 1:
        comm = None
    if state is None:
        x = np.array(x0, dtype=np.float64).reshape(-1)
        if point_dim < 1 or x.shape[0] % point_dim:
            raise ValueError(f"len(x) = {x.shape[0]} is not a multiple of point_dim = {point_dim}")
        f, g = fun(x.copy())
        g = np.array(g, dtype=np.float64).reshape(-1)
        if g.shape != x.shape:
            raise ValueError(f"gradient has {g.shape[0]} components, x has {x.shape[0]}")
        state = LBFGSState.new(x, float(f), g, m, n_evals=1)
    elif state.m != m:
        raise ValueError(f"the state has memory m = {state.m}, called with m = {m}")
    n = state.x.shape[0]
    if point_dim < 1 or n % point_dim:
        raise ValueError(f"len(x) = {n} is not a multiple of point_dim = {point_dim}")
    if not math.isfinite(state.f):
        raise ValueError(f"the objective is not finite at the start point (f = {state.f})")

    d = np.empty(n)
    alpha = np.empty(m)
    status = "maxiter"
    failed_once = False
    while True:
        if _global_max(comm, _absmax(state.g)) <= gtol:     # (also when there is no vector)
            status = "gtol"
            break
        if state.iteration >= maxiter:
            status = "maxiter"
            break
        if comm is None:
            _two_loop(state.g, state.S, state.Y, state.rho, state.count, state.pos, alpha, d)
        else:
            _two_loop_split(comm, state.g, state.S, state.Y, state.rho, state.count, state.pos, alpha, d)
        if not _gdot(comm, state.g, d) < 0.0:          # no descent (bad curvature information)
            state.reset_history()
            np.negative(state.g, out=d)
        dmax, drms = _point_norms(d, point_dim) if comm is None else _split_point_norms(comm, d, point_dim)
        a_max = math.inf if max_step is None or dmax == 0.0 else max_step / dmax
        a_init = 1.0 if state.count > 0 else (first_step / drms if drms > 0 else 1.0)
        ls = _LineSearch(fun, state.x, state.f, state.g, d, state, comm)
        res = ls.run(a_init, a_max, max_ls)
        if res is None:
            if failed_once or state.count == 0:
                status = "linesearch"
                break
            failed_once = True
            state.reset_history()
            continue
        failed_once = False
        a, x_new, f_new, g_new = res
        sy, yy = _global_sum(comm, *_curvature(x_new, state.x, g_new, state.g))
        if sy > CURV_EPS * yy:
            _store_diff(state.S[state.pos], x_new, state.x)
            _store_diff(state.Y[state.pos], g_new, state.g)
            state.rho[state.pos] = 1.0 / sy
            state.pos = (state.pos + 1) % m
            state.count = min(state.count + 1, m)
        f_prev = state.f
        state.x, state.f, state.g = x_new, f_new, g_new
        state.iteration += 1
        if f_prev - f_new <= ftol * max(abs(f_prev), abs(f_new), 1.0):
            status = "ftol"
            break
        if callback is not None:
            xv = state.x.view()
            xv.flags.writeable = False
            if callback(state.iteration, xv, state.f):
                status = "callback"
                break
    info = {"status": status, "iterations": state.iteration, "n_evals": state.n_evals}
    return state.x.copy(), state.f, state, info
