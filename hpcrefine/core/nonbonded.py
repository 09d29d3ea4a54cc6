"""Non-bonded repulsion with an O(atoms) neighbour list.

Contact distance of a pair (i, j):
    d0 = r_i + r_j                      (r = Restraints.vdw_radius)
    d0 = min(d0, 2.7 A)                 if one atom can donate and the other accept an H-bond
                                        (hbond_type: 1 donor, 2 acceptor, 3 both)
    d0 = d0 - 0.5 A                     if the pair is a 1-4 pair (Restraints.pair14)
Pairs in Restraints.excl_pairs (1-2 and 1-3 neighbours) are never restrained; an excluded pair
that is also listed as 1-4 stays excluded.

Energy: E = sum over pairs with d < d0 of ((d0 - d) / sigma)^2, zero beyond; its first derivative
is continuous at d = d0.

The list keeps every non-excluded pair with d < d0 + skin (skin = cutoff_extra), as two int32
atom-index arrays (i < j, sorted by i) and an int8 1-4 flag: 9 bytes per pair. It stays valid until
an atom has moved more than skin / 2 from where it was at the build (`needs_update`); `refresh`
searches again only around the atoms that moved that far.

Search: a cell list (cells of edge max(d0) + skin, half-shell stencil of 14 cells) over copies of
the coordinates, radii and flags in cell order, so the inner loop reads memory sequentially. The
special pairs are kept per atom as two 64-bit masks (partners i+1 .. i+64, which covers almost every
1-2, 1-3 and 1-4 partner since bonded atoms are close in file order) plus a small overflow table for
the rest, so deciding whether a candidate is excluded costs a shift and no search; no pair keys are
sorted and the list of all candidates is never stored. The pair buffers grow outside the hot
loop when needed; the final arrays are exact-size copies made by a counting sort on i.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from .common import add_at, diff, dot, grad_array, row, scale, sub, sub_at
from .common import coords as _coords

HBOND_D0 = 2.7      # A, contact distance of an H-bond donor/acceptor pair
D0_14_SHIFT = 0.5   # A, subtracted from the contact distance of 1-4 pairs

_EXCL = 1           # exclusion-table codes
_P14 = 2


@njit(cache=True)
def _contact(ri, rj, hi, hj, kind):
    d0 = ri + rj
    if ((hi & 1) != 0 and (hj & 2) != 0) or ((hi & 2) != 0 and (hj & 1) != 0):
        if d0 > HBOND_D0:
            d0 = HBOND_D0
    if kind != 0:
        d0 -= D0_14_SHIFT
    return d0


MASK_SPAN = 64      # partners j = i + 1 .. i + 64 live in per-atom bit masks


@njit(cache=True)
def _build_table(n, excl, p14):
    """Special pairs (i < j) of every atom i: bit (j - i - 1) of mask_ex[i] / mask_14[i] for
    j - i <= 64 (almost all bonded neighbours: atoms of a residue and the next one are close in
    index); the others in an overflow table: partners part[start[i]:start[i+1]] with codes
    code[...] (1 excluded, 2 1-4), and has_over[i] set when atom i has any."""
    mask_ex = np.zeros(n, dtype=np.uint64)
    mask_14 = np.zeros(n, dtype=np.uint64)
    has_over = np.zeros(n, dtype=np.bool_)
    start = np.zeros(n + 1, dtype=np.int64)
    for which in range(2):
        pairs = excl if which == 0 else p14
        for t in range(pairs.shape[0]):
            a = min(pairs[t, 0], pairs[t, 1])
            b = max(pairs[t, 0], pairs[t, 1])
            off = b - a
            if off == 0:
                continue
            if off <= MASK_SPAN:
                bit = np.uint64(1) << np.uint64(off - 1)
                if which == 0:
                    mask_ex[a] |= bit
                else:
                    mask_14[a] |= bit
            else:
                start[a + 1] += 1
                has_over[a] = True
    for i in range(n):
        start[i + 1] += start[i]
    fill = start[:-1].copy()
    part = np.empty(start[n], dtype=np.int32)
    code = np.empty(start[n], dtype=np.int8)
    for which in range(2):
        pairs = excl if which == 0 else p14
        for t in range(pairs.shape[0]):
            a = min(pairs[t, 0], pairs[t, 1])
            b = max(pairs[t, 0], pairs[t, 1])
            if b - a > MASK_SPAN:
                part[fill[a]] = b
                code[fill[a]] = _EXCL if which == 0 else _P14
                fill[a] += 1
    return mask_ex, mask_14, has_over, start, part, code


@njit(cache=True)
def _overflow_code(i, j, start, part, code):
    """Code of pair (i, j), i < j, j - i > 64, from the overflow table: 0 ordinary, 1 excluded,
    2 1-4 (exclusion wins)."""
    c = 0
    for q in range(start[i], start[i + 1]):
        if part[q] == j:
            if code[q] == _EXCL:
                return _EXCL
            c = _P14
    return c


@njit(cache=True)
def _cells(xyz, cell):
    n = xyz.shape[0]
    lo = np.empty(3)
    hi = np.empty(3)
    for c in range(3):
        lo[c] = xyz[0, c]
        hi[c] = xyz[0, c]
    for a in range(n):
        for c in range(3):
            v = xyz[a, c]
            if v < lo[c]:
                lo[c] = v
            if v > hi[c]:
                hi[c] = v
    dims = np.empty(3, dtype=np.int64)
    # sparse or elongated systems: widen the cells so there are at most ~4 cells per atom
    while True:
        for c in range(3):
            dims[c] = int((hi[c] - lo[c]) / cell) + 1
        if dims[0] * dims[1] * dims[2] <= 4 * n + 64:
            break
        cell *= 1.26
    ncell = dims[0] * dims[1] * dims[2]
    cid = np.empty(n, dtype=np.int64)
    cstart = np.zeros(ncell + 1, dtype=np.int64)
    for a in range(n):
        ix = min(int((xyz[a, 0] - lo[0]) / cell), dims[0] - 1)
        iy = min(int((xyz[a, 1] - lo[1]) / cell), dims[1] - 1)
        iz = min(int((xyz[a, 2] - lo[2]) / cell), dims[2] - 1)
        cid[a] = (iz * dims[1] + iy) * dims[0] + ix
        cstart[cid[a] + 1] += 1
    for c in range(ncell):
        cstart[c + 1] += cstart[c]
    order = np.empty(n, dtype=np.int32)
    fill = cstart[:-1].copy()
    for a in range(n):               # stable counting sort: atoms of a cell in index order
        order[fill[cid[a]]] = a
        fill[cid[a]] += 1
    return dims, cstart, order, lo, cell


@njit(cache=True)
def _grow(a, cap):
    b = np.empty(cap, dtype=a.dtype)
    b[:a.shape[0]] = a
    return b


@njit(cache=True, inline="always")
def _special(lo, hi, mask_ex_lo, mask_14_lo, has_over_lo, tstart, tpart, tcode):
    """(excluded, 1-4) flags of pair lo < hi from lo's bit masks, or the overflow table."""
    off = hi - lo
    if off <= MASK_SPAN:
        sh = np.uint64(off - 1)
        return np.int64((mask_ex_lo >> sh) & np.uint64(1)), np.int64((mask_14_lo >> sh) & np.uint64(1))
    if has_over_lo:
        code = _overflow_code(lo, hi, tstart, tpart, tcode)
        return np.int64(1 if code == _EXCL else 0), np.int64(1 if code == _P14 else 0)
    return np.int64(0), np.int64(0)


_STENCIL_ROWS = 5   # rows of cells (dz, dy) = (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)


@njit(cache=True, inline="always")
def _stencil_row(r, cx, cy, cz, nx, ny, nz):
    """Cells e0 .. e1 (inclusive, consecutive; none when e0 > e1) of row r of the half-shell
    stencil of cell (cx, cy, cz): the cell itself and the 13 of its 26 neighbours with a
    lexicographically positive offset (dz, dy, dx). Rows come in increasing cell order."""
    if r < 2:
        ez = cz
        ey = cy + r
    else:
        ez = cz + 1
        ey = cy + r - 3
    if ez >= nz or ey < 0 or ey >= ny:
        return 0, -1
    base = (ez * ny + ey) * nx
    x0 = cx if r == 0 else max(cx - 1, 0)
    return base + x0, base + min(cx + 1, nx - 1)


@njit(cache=True)
def _search_cells(c_begin, xs, rs, hs, mex, m14, mov, order, skin, rcut, dims, cstart,
                  tstart, tpart, tcode, owned, cell_owned, gs, out_i, out_j, out_k, npairs):
    """Pairs of cells c_begin, c_begin + 1, ... (half-shell stencil) appended to out_* from
    position npairs. Stops before a cell whose candidates might not fit; returns (npairs, the
    next cell to do, the room that cell needs). With a non-empty owned (uint8 per atom), only
    pairs whose lower index is owned are kept, and cells without owned atoms in their stencil
    are skipped. With a non-empty gs (the atoms' groups, int64, in cell order), pairs of two
    atoms of the same group are skipped."""
    use_own = owned.shape[0] > 0
    use_group = gs.shape[0] > 0
    rc2 = rcut * rcut
    hb_lim = HBOND_D0 + skin
    cap = out_i.shape[0]
    nx = dims[0]
    ny = dims[1]
    nz = dims[2]
    ncell = nx * ny * nz
    for c in range(c_begin, ncell):
        a0 = cstart[c]
        a1 = cstart[c + 1]
        if a0 == a1:
            continue
        cx = c % nx
        cy = (c // nx) % ny
        cz = c // (nx * ny)
        if use_own and cell_owned[c] == 0:
            near = 0
            for r in range(_STENCIL_ROWS):
                e0, e1 = _stencil_row(r, cx, cy, cz, nx, ny, nz)
                for e in range(e0, e1 + 1):
                    near |= cell_owned[e]
            if near == 0:
                continue
        # worst case for this cell: every atom pairs with every atom of the stencil
        worst = 0
        for r in range(_STENCIL_ROWS):
            e0, e1 = _stencil_row(r, cx, cy, cz, nx, ny, nz)
            if e0 <= e1:
                worst += cstart[e1 + 1] - cstart[e0]
        if npairs + (a1 - a0) * worst > cap:
            return npairs, c, (a1 - a0) * worst
        for r in range(_STENCIL_ROWS):
            e0, e1 = _stencil_row(r, cx, cy, cz, nx, ny, nz)
            for e in range(e0, e1 + 1):
                same = e == c
                b0 = cstart[e]
                b1 = cstart[e + 1]
                for p in range(a0, a1):
                    q0 = p + 1 if same else b0
                    xi = xs[p, 0]
                    yi = xs[p, 1]
                    zi = xs[p, 2]
                    ri = rs[p] + skin
                    hi = np.int64(hs[p])
                    oi = np.int64(order[p])
                    gi = gs[p] if use_group else 0
                    for q in range(q0, b1):
                        if use_group and gs[q] == gi:
                            continue
                        ddx = xs[q, 0] - xi
                        ddy = xs[q, 1] - yi
                        ddz = xs[q, 2] - zi
                        d2 = ddx * ddx + ddy * ddy + ddz * ddz
                        if d2 >= rc2:
                            continue
                        # contact distance + skin, H-bond pairs capped (as in _contact)
                        hj = np.int64(hs[q])
                        lim = ri + rs[q]
                        if ((hi & (hj >> 1)) | (hj & (hi >> 1))) & 1:
                            lim = min(lim, hb_lim)
                        if d2 >= lim * lim:
                            continue
                        oj = np.int64(order[q])
                        sw = oi > oj
                        lo_ = oj if sw else oi
                        hi_ = oi if sw else oj
                        pp = q if sw else p
                        excl, k14 = _special(lo_, hi_, mex[pp], m14[pp], mov[pp], tstart, tpart, tcode)
                        lim14 = max(lim - D0_14_SHIFT, 0.0)
                        near14 = 1 if d2 < lim14 * lim14 else 0
                        # write every candidate, advance only for accepted ones (no branch)
                        out_i[npairs] = lo_
                        out_j[npairs] = hi_
                        out_k[npairs] = k14
                        acc = (1 - excl) * (1 - k14 + k14 * near14)
                        if use_own:
                            acc *= np.int64(owned[lo_])
                        npairs += acc
    return npairs, ncell, 0


@njit(cache=True)
def _search(xs, rs, hs, mex, m14, mov, order, skin, rcut, dims, cstart, tstart, tpart, tcode,
            cap, owned, group):
    """All accepted pairs. xs, rs, hs, mex, m14, mov hold coordinates, radii, H-bond types and
    special-pair masks in cell order (xs[p] = xyz[order[p]]), so the loops read memory nearly
    sequentially. Returns (i, j, kind, npairs); the arrays may be longer than npairs. (The
    buffers are grown here, outside the hot loop, which only ever sees fixed arrays.)"""
    out_i = np.empty(cap, dtype=np.int32)
    out_j = np.empty(cap, dtype=np.int32)
    out_k = np.empty(cap, dtype=np.int8)
    ncell = dims[0] * dims[1] * dims[2]
    cell_owned = np.zeros(ncell if owned.shape[0] > 0 else 0, dtype=np.uint8)
    if owned.shape[0] > 0:
        for c in range(ncell):
            for p in range(cstart[c], cstart[c + 1]):
                if owned[order[p]]:
                    cell_owned[c] = 1
                    break
    gs = np.empty(order.shape[0] if group.shape[0] > 0 else 0, dtype=np.int64)
    for p in range(gs.shape[0]):
        gs[p] = group[order[p]]
    npairs = 0
    c = 0
    while True:
        npairs, c, need = _search_cells(c, xs, rs, hs, mex, m14, mov, order, skin, rcut, dims,
                                        cstart, tstart, tpart, tcode, owned, cell_owned, gs,
                                        out_i, out_j, out_k, npairs)
        if c >= ncell:
            break
        cap = max(cap + cap // 2, npairs + need + 1024)
        out_i = _grow(out_i, cap)
        out_j = _grow(out_j, cap)
        out_k = _grow(out_k, cap)
    return out_i, out_j, out_k, npairs


@njit(cache=True)
def _sort_by_first(n, pi, pj, pk, npairs):
    """Exact-size copies of the first npairs pairs sorted by (i, j) (counting sort on i): the
    repulsion kernel then reads atom i's data sequentially."""
    start = np.zeros(n + 1, dtype=np.int64)
    for t in range(npairs):
        start[pi[t] + 1] += 1
    for a in range(n):
        start[a + 1] += start[a]
    oi = np.empty(npairs, dtype=np.int32)
    oj = np.empty(npairs, dtype=np.int32)
    ok = np.empty(npairs, dtype=np.int8)
    for t in range(npairs):
        a = pi[t]
        pos = start[a]
        start[a] = pos + 1
        oi[pos] = a
        oj[pos] = pj[t]
        ok[pos] = pk[t]
    # then by j within each i (insertion sort of short runs): the list's order, and so the
    # summation order of the repulsion gradient, does not depend on where the list was built
    b = 0
    while b < npairs:
        e = b + 1
        while e < npairs and oi[e] == oi[b]:
            e += 1
        for t in range(b + 1, e):
            vj = oj[t]
            vk = ok[t]
            u = t - 1
            while u >= b and oj[u] > vj:
                oj[u + 1] = oj[u]
                ok[u + 1] = ok[u]
                u -= 1
            oj[u + 1] = vj
            ok[u + 1] = vk
        b = e
    return oi, oj, ok


@njit(cache=True)
def _gather(xyz, radius, hb, mask_ex, mask_14, has_over, order):
    n = order.shape[0]
    xs = np.empty((n, 3))
    rs = np.empty(n)
    hs = np.empty(n, dtype=np.int8)
    mex = np.empty(n, dtype=np.uint64)
    m14 = np.empty(n, dtype=np.uint64)
    mov = np.empty(n, dtype=np.bool_)
    for p in range(n):
        a = order[p]
        xs[p, 0] = xyz[a, 0]
        xs[p, 1] = xyz[a, 1]
        xs[p, 2] = xyz[a, 2]
        rs[p] = radius[a]
        hs[p] = hb[a]
        mex[p] = mask_ex[a]
        m14[p] = mask_14[a]
        mov[p] = has_over[a]
    return xs, rs, hs, mex, m14, mov


@njit(cache=True)
def _two_largest_moves(xyz, ref):
    """The two largest displacements (A) of any atom since ref."""
    m1 = 0.0
    m2 = 0.0
    for a in range(xyz.shape[0]):
        d = sub(row(xyz, a), row(ref, a))
        d2 = dot(d, d)
        if d2 > m2:
            if d2 > m1:
                m2 = m1
                m1 = d2
            else:
                m2 = d2
    return np.sqrt(m1), np.sqrt(m2)


def largest_move(xyz, ref) -> float:
    """The largest displacement (A) of any atom from ref to xyz."""
    return float(_two_largest_moves(_coords(xyz), _coords(ref))[0])


@njit(cache=True)
def _movers(xyz, ref, limit):
    """Indices of the atoms that moved more than `limit` (A) from ref."""
    lim2 = limit * limit
    count = 0
    for a in range(xyz.shape[0]):
        d = sub(row(xyz, a), row(ref, a))
        if dot(d, d) > lim2:
            count += 1
    out = np.empty(count, dtype=np.int64)
    count = 0
    for a in range(xyz.shape[0]):
        d = sub(row(xyz, a), row(ref, a))
        if dot(d, d) > lim2:
            out[count] = a
            count += 1
    return out


@njit(cache=True)
def _mover_pairs(ref, movers, is_mover, radius, hb, mask_ex, mask_14, has_over, tstart, tpart, tcode,
                 skin, rcut, dims, cstart, order, lo, cell, owned, group, out_i, out_j, out_k):
    """The accepted pairs (as _search_cells accepts them, at the reference positions ref) that
    involve a mover: every cell around each mover is scanned (27 cells); a pair of two movers
    is taken from its lower atom's scan. Writes the pairs into out_* while they have room and
    returns how many there are (more than the room: search again with larger arrays)."""
    use_own = owned.shape[0] > 0
    use_group = group.shape[0] > 0
    rc2 = rcut * rcut
    hb_lim = HBOND_D0 + skin
    nx = dims[0]
    ny = dims[1]
    nz = dims[2]
    npairs = 0
    for t in range(movers.shape[0]):
        a = movers[t]
        ix = min(max(int((ref[a, 0] - lo[0]) / cell), 0), nx - 1)
        iy = min(max(int((ref[a, 1] - lo[1]) / cell), 0), ny - 1)
        iz = min(max(int((ref[a, 2] - lo[2]) / cell), 0), nz - 1)
        ra = radius[a] + skin
        ha = np.int64(hb[a])
        for ez in range(max(iz - 1, 0), min(iz + 2, nz)):
            for ey in range(max(iy - 1, 0), min(iy + 2, ny)):
                base = (ez * ny + ey) * nx
                for e in range(base + max(ix - 1, 0), base + min(ix + 2, nx)):
                    for q in range(cstart[e], cstart[e + 1]):
                        b = np.int64(order[q])
                        if b == a or (is_mover[b] and b < a):
                            continue
                        lo_ = min(a, b)
                        hi_ = max(a, b)
                        if use_own and owned[lo_] == 0:
                            continue
                        if use_group and group[a] == group[b]:
                            continue
                        ddx = ref[b, 0] - ref[a, 0]
                        ddy = ref[b, 1] - ref[a, 1]
                        ddz = ref[b, 2] - ref[a, 2]
                        d2 = ddx * ddx + ddy * ddy + ddz * ddz
                        if d2 >= rc2:
                            continue
                        hb_b = np.int64(hb[b])
                        lim = ra + radius[b]
                        if ((ha & (hb_b >> 1)) | (hb_b & (ha >> 1))) & 1:
                            lim = min(lim, hb_lim)
                        if d2 >= lim * lim:
                            continue
                        excl, k14 = _special(lo_, hi_, mask_ex[lo_], mask_14[lo_], has_over[lo_],
                                             tstart, tpart, tcode)
                        if excl:
                            continue
                        if k14:
                            lim14 = max(lim - D0_14_SHIFT, 0.0)
                            if d2 >= lim14 * lim14:
                                continue
                        if npairs < out_i.shape[0]:
                            out_i[npairs] = lo_
                            out_j[npairs] = hi_
                            out_k[npairs] = k14
                        npairs += 1
    return npairs


@njit(cache=True)
def _replace_mover_pairs(pi, pj, pk, is_mover, ni, nj, nk, nnew):
    """The list (pi, pj, pk), sorted by (i, j), with every pair that involves a mover dropped and
    the first nnew new pairs (ni, nj, nk: the movers' pairs, any order) merged in: arrays sorted
    by (i, j), as _sort_by_first would give, in one pass over the old list. They are the leading
    part of arrays sized for the old list plus the new pairs (views: the dropped pairs' room is
    not worth a second pass to count them first)."""
    if nnew > 0:
        n = np.int64(max(np.max(ni[:nnew]), np.max(nj[:nnew]))) + 1
        key = np.empty(nnew, dtype=np.int64)
        for t in range(nnew):
            key[t] = np.int64(ni[t]) * n + np.int64(nj[t])
        order = np.argsort(key)                  # keys are distinct: the order is unique
    else:
        order = np.zeros(0, dtype=np.int64)
    cap = pi.shape[0] + nnew
    oi = np.empty(cap, dtype=np.int32)
    oj = np.empty(cap, dtype=np.int32)
    ok = np.empty(cap, dtype=np.int8)
    u = 0                                        # next new pair (in sorted order): (qi, qj)
    w = 0
    past = np.int32(2**31 - 1)                   # qi when no new pair is left (no atom index)
    qi = ni[order[0]] if nnew > 0 else past
    qj = nj[order[0]] if nnew > 0 else np.int32(0)
    for t in range(pi.shape[0]):
        a = pi[t]
        b = pj[t]
        if is_mover[a] or is_mover[b]:
            continue
        while qi < a or (qi == a and qj < b):
            oi[w] = qi
            oj[w] = qj
            ok[w] = nk[order[u]]
            w += 1
            u += 1
            if u < nnew:
                qi = ni[order[u]]
                qj = nj[order[u]]
            else:
                qi = past
        oi[w] = a
        oj[w] = b
        ok[w] = pk[t]
        w += 1
    while u < nnew:
        q = order[u]
        oi[w] = ni[q]
        oj[w] = nj[q]
        ok[w] = nk[q]
        w += 1
        u += 1
    return oi[:w], oj[:w], ok[:w]


@njit(cache=True)
def _repulsion_kernel(xyz, pi, pj, pk, radius, hb, sigma, weight, grad):
    e = 0.0
    inv = 1.0 / (sigma * sigma)
    for t in range(pi.shape[0]):
        i = pi[t]
        j = pj[t]
        d0 = _contact(radius[i], radius[j], hb[i], hb[j], pk[t])
        dv = diff(xyz, i, j)
        d2 = dot(dv, dv)
        if d2 >= d0 * d0:
            continue
        d = math.sqrt(d2)
        dev = d0 - d
        e += weight * inv * dev * dev
        if d > 0.0:
            g = scale(-2.0 * weight * inv * dev / d, dv)
            add_at(grad, i, g)
            sub_at(grad, j, g)
    return e


@njit(cache=True)
def _clash_kernel(xyz, pi, pj, pk, radius, hb, overlap):
    n = 0
    for t in range(pi.shape[0]):
        i = pi[t]
        j = pj[t]
        lim = _contact(radius[i], radius[j], hb[i], hb[j], pk[t]) - overlap
        if lim <= 0.0:
            continue
        dv = diff(xyz, i, j)
        if dot(dv, dv) < lim * lim:
            n += 1
    return n


def _pairs(a, n, what) -> np.ndarray:
    a = np.asarray(a)
    if a.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    a = a.reshape(-1, 2)
    if a.dtype != np.int64 and a.dtype != np.int32:
        a = a.astype(np.int64)
    if a.min() < 0 or a.max() >= n:
        raise ValueError(f"{what} holds atom indices outside 0..{n - 1}")
    return a


class NeighbourList:
    """Pairs that may come within their contact distance while no atom moves more than skin/2.

    Attributes: i, j (int32, i < j, sorted by i), kind (int8, 1 for a 1-4 pair), radius
    (float64 per atom), hbond (int8 per atom), skin, rcut (search radius), xyz_ref (coordinates
    at the build, per atom: see refresh), n_builds, n_partial. `update(xyz)` rebuilds in place and
    reuses the exclusion masks, which is a little cheaper than constructing a new list;
    `refresh(xyz)` updates only around the atoms that moved far, and only when needed.
    """

    def __init__(self, xyz, restraints=None, cutoff_extra: float = 1.0, *, vdw_radius=None,
                 hbond_type=None, excl_pairs=None, pair14=None, owned=None, group=None):
        """Build from xyz and a Restraints (vdw_radius, hbond_type, excl_pairs, pair14); any of
        the four can be given as keyword arrays instead (they override the Restraints).
        owned (bool per atom): list only the pairs whose lower index is owned (one rank's share
        of a distributed list; the search skips the space far from owned atoms).
        group (int per atom): list only the pairs of atoms in different groups (the contacts
        between NCS copies: the pairs within a copy are never written, kept or sorted)."""
        xyz = _coords(xyz)
        n = len(xyz)
        if n >= 2**31 - 1:
            raise ValueError("more than 2^31 atoms are not supported")
        r = restraints
        if vdw_radius is None:
            if r is None:
                raise ValueError("give a Restraints or vdw_radius")
            vdw_radius = r.vdw_radius
        if hbond_type is None:
            hbond_type = r.hbond_type if r is not None else np.zeros(0)
        if excl_pairs is None:
            excl_pairs = r.excl_pairs if r is not None else np.zeros((0, 2))
        if pair14 is None:
            pair14 = r.pair14 if r is not None else np.zeros((0, 2))
        self.radius = np.ascontiguousarray(vdw_radius, dtype=np.float64)
        if self.radius.shape != (n,):
            raise ValueError(f"vdw_radius has shape {self.radius.shape}, expected ({n},)")
        hbond_type = np.asarray(hbond_type)
        self.hbond = (np.zeros(n, dtype=np.int8) if hbond_type.size == 0
                      else np.ascontiguousarray(hbond_type, dtype=np.int8))
        if self.hbond.shape != (n,):
            raise ValueError(f"hbond_type has shape {self.hbond.shape}, expected ({n},)")
        if cutoff_extra < 0:
            raise ValueError("cutoff_extra must be >= 0")
        self.skin = float(cutoff_extra)
        self._table = _build_table(n, _pairs(excl_pairs, n, "excl_pairs"),
                                   _pairs(pair14, n, "pair14"))
        if len(self.radius) and not (self.radius.min() >= 0):
            raise ValueError("vdw_radius must be >= 0")
        self.owned = (np.zeros(0, dtype=np.uint8) if owned is None
                      else np.ascontiguousarray(owned, dtype=np.uint8))
        if self.owned.size and self.owned.shape != (n,):
            raise ValueError(f"owned has shape {self.owned.shape}, expected ({n},)")
        self.group = (np.zeros(0, dtype=np.int64) if group is None
                      else np.ascontiguousarray(group, dtype=np.int64))
        if self.group.size and self.group.shape != (n,):
            raise ValueError(f"group has shape {self.group.shape}, expected ({n},)")
        self.n_builds = 0            # whole-list builds
        self.n_partial = 0           # updates around the atoms that moved (refresh)
        self._cap_hint = 0
        self._mover_room = 0         # room for the movers' pairs of the next refresh
        self.update(xyz)

    def update(self, xyz) -> None:
        """Rebuild the pair list at xyz (keeps radii and exclusions)."""
        xyz = _coords(xyz)
        n = len(xyz)
        if n != len(self.radius):
            raise ValueError(f"xyz has {n} atoms, the list was made for {len(self.radius)}")
        if not np.isfinite(xyz).all():
            raise ValueError("non-finite coordinates")
        self.xyz_ref = xyz.copy()
        self.max_d0 = 2.0 * float(self.radius.max()) if n else 0.0
        self.rcut = self.max_d0 + self.skin
        empty_i = np.zeros(0, dtype=np.int32)
        empty_k = np.zeros(0, dtype=np.int8)
        if n < 2 or self.rcut <= 0:
            self.i, self.j, self.kind = empty_i, empty_i.copy(), empty_k
        else:
            dims, cstart, order, _, _ = _cells(xyz, self.rcut)
            mask_ex, mask_14, has_over, tstart, tpart, tcode = self._table
            cell_data = _gather(xyz, self.radius, self.hbond, mask_ex, mask_14, has_over, order)
            n_own = int(self.owned.sum()) if self.owned.size else n
            cap = self._cap_hint if self._cap_hint else 6 * n_own + 1024
            bi, bj, bk, npairs = _search(*cell_data, order, self.skin, self.rcut, dims, cstart,
                                         tstart, tpart, tcode, cap, self.owned, self.group)
            del cell_data, order, cstart
            self.i, self.j, self.kind = _sort_by_first(n, bi, bj, bk, npairs)
            self._cap_hint = int(npairs * 1.1) + 1024
        self.n_builds += 1

    def __len__(self) -> int:
        return len(self.i)

    @property
    def pairs(self) -> np.ndarray:
        """(npairs, 2) int64 copy of the pair indices."""
        return np.stack([self.i, self.j], axis=1).astype(np.int64)

    def contact_distance(self) -> np.ndarray:
        """d0 of every listed pair (A)."""
        d0 = self.radius[self.i] + self.radius[self.j]
        hi = self.hbond[self.i]
        hj = self.hbond[self.j]
        hb = (((hi & 1) != 0) & ((hj & 2) != 0)) | (((hi & 2) != 0) & ((hj & 1) != 0))
        d0 = np.where(hb, np.minimum(d0, HBOND_D0), d0)
        return d0 - D0_14_SHIFT * (self.kind != 0)

    def needs_update(self, xyz) -> bool:
        """True when some pair may have come closer by more than the skin since the build: the
        two largest atom displacements add up to more than the skin (a pair's distance changes by
        at most the sum of its two atoms' displacements)."""
        xyz = _coords(xyz)
        if xyz.shape != self.xyz_ref.shape:
            return True
        m1, m2 = _two_largest_moves(xyz, self.xyz_ref)
        return bool(m1 + m2 > self.skin)

    full_fraction = 0.2      # refresh rebuilds the whole list when more atoms than this moved far
    mover_share = 0.5        # refresh searches again around the atoms that moved this share of the skin

    def refresh(self, xyz) -> bool:
        """Keep the list valid at xyz, doing as little as possible; True when the list changed.

        Every atom keeps its own reference position, and the list holds every pair whose
        reference positions are closer than contact + skin. While no two atoms have moved more
        than the skin in all from their references, that list holds every pair in contact
        (nothing to do). Otherwise only the atoms that moved more than skin / 2 (the movers) take
        their present positions as references: their pairs are dropped and searched again around
        them, which keeps the rule for every pair, and afterwards no atom is more than skin / 2
        from its reference. When more than full_fraction of the atoms moved, the whole list is
        rebuilt instead. Pairs beyond contact add nothing to the energy and the list stays
        sorted by (i, j), so energies and gradients are bitwise those of a list built afresh."""
        xyz = _coords(xyz)
        if xyz.shape != self.xyz_ref.shape:
            self.update(xyz)
            return True
        m1, m2 = _two_largest_moves(xyz, self.xyz_ref)
        if m1 + m2 <= self.skin:
            return False
        n = len(xyz)
        movers = _movers(xyz, self.xyz_ref, self.skin * self.mover_share)
        if len(movers) > self.full_fraction * n or n < 2 or self.rcut <= 0:
            self.update(xyz)
            return True
        if not np.isfinite(xyz[movers]).all():
            raise ValueError("non-finite coordinates")
        self.xyz_ref[movers] = xyz[movers]
        is_mover = np.zeros(n, dtype=np.bool_)
        is_mover[movers] = True
        dims, cstart, order, lo, cell = _cells(self.xyz_ref, self.rcut)
        mask_ex, mask_14, has_over, tstart, tpart, tcode = self._table
        args = (self.xyz_ref, movers, is_mover, self.radius, self.hbond, mask_ex, mask_14, has_over,
                tstart, tpart, tcode, self.skin, self.rcut, dims, cstart, order, lo, cell, self.owned,
                self.group)
        room = max(self._mover_room, 64 * len(movers))
        while True:             # one search, a second only when the pairs outgrow the room
            ni, nj, nk = np.empty(room, np.int32), np.empty(room, np.int32), np.empty(room, np.int8)
            count = _mover_pairs(*args, ni, nj, nk)
            if count <= room:
                break
            room = count
        self._mover_room = count + count // 2
        self.i, self.j, self.kind = _replace_mover_pairs(self.i, self.j, self.kind, is_mover, ni, nj,
                                                         nk, count)
        self.n_partial += 1
        return True

    def nbytes(self) -> int:
        return (self.i.nbytes + self.j.nbytes + self.kind.nbytes + self.radius.nbytes
                + self.hbond.nbytes + self.xyz_ref.nbytes + self.group.nbytes
                + sum(a.nbytes for a in self._table))


class ListKeeper:
    """One neighbour list (and whatever goes with it) kept from a minimisation's target for the
    next target of the same restraints object and the same keys (arrays compared by value):
    every minimisation makes a new target, and they run one after another, so one target at a
    time refreshes the kept list instead of searching the whole model again. Asking with other
    restraints or keys lets go of the kept list (nothing to share then)."""

    def __init__(self):
        self._last = None

    def get(self, restraints, *keys):
        """The value kept for these restraints and keys, or None (and nothing kept any more)."""
        last = self._last
        if (last is not None and last[0] is restraints and len(last[1]) == len(keys)
                and all(np.array_equal(a, b) for a, b in zip(last[1], keys))):
            return last[2]
        self._last = None
        return None

    def keep(self, restraints, keys: tuple, value) -> None:
        self._last = (restraints, tuple(keys), value)

    def clear(self) -> None:
        self._last = None


def repulsion(xyz, nbl: NeighbourList, sigma: float = 0.2, grad_out=None, weight: float = 1.0):
    """Repulsion energy sum_{d < d0} weight ((d0 - d) / sigma)^2 over the listed pairs, and its
    gradient (added into grad_out if given)."""
    xyz = _coords(xyz)
    grad_out = grad_array(xyz, grad_out)
    e = _repulsion_kernel(xyz, nbl.i, nbl.j, nbl.kind, nbl.radius, nbl.hbond, float(sigma),
                          float(weight), grad_out)
    return float(e), grad_out


def clashes(xyz, nbl: NeighbourList, overlap: float = 0.4) -> int:
    """Number of listed pairs closer than d0 - overlap."""
    xyz = _coords(xyz)
    return int(_clash_kernel(xyz, nbl.i, nbl.j, nbl.kind, nbl.radius, nbl.hbond, float(overlap)))
