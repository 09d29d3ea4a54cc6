"""Structural domains of protein chains found from the model alone (`--rigid-groups auto`).

Each protein chain is split by recursive bisection of its C-alpha contact graph, in the spirit
of PDP (Alexandrov & Shindyalov 2003) and DomainParser (Xu, Xu & Gabow 2000): two C-alphas are in
contact within CONTACT_CUTOFF (7.5 A) when they are at least MIN_SEPARATION residues apart in the
chain. A domain is split in two by one cut of its residues (in chain order) into a head and a
tail, or by two cuts into a middle piece and the rest around it, so a domain may hold several
sequence segments (adenylate kinase's CORE is 1-29, 60-121 and 160-214). Every split with both
parts at least MIN_DOMAIN residues and every piece left around a middle cut at least MIN_SEGMENT
residues is scored as

    score = contacts(A, B) / (n_A * n_B) ** SIZE_EXPONENT

(the PDP normalisation: the contacts across the interface relative to the sizes of the two
parts), and the best split of any domain is taken, best first, while its score is below
MAX_SPLIT_SCORE and the chain has fewer than MAX_DOMAINS domains. The figures behind the
constants (scripts/bench_domains.py --scores): adk's LID splits off at 0.19 (open) and 0.26
(closed), its NMP at 0.31 in the open form (0.69 in the closed one, packed onto the CORE: not
split), the best further split of the CORE scores 0.53 / 0.69, and the best split of a single
Ig domain (the scFv VH and VL chains of 7cth, 105-128 residues) 1.3-1.7. At 8 A and a limit of
0.8 the open form came out in four pieces (a 30-residue hinge piece split off the CORE at 0.68).

Residues of a protein chain without a C-alpha (ligands, waters in the chain) join the domain of
the nearest C-alpha; chains without enough C-alphas for two domains (and non-protein chains)
are one group each, as without `auto`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

CONTACT_CUTOFF = 7.5       # A between C-alphas
MIN_SEPARATION = 3         # residues apart in the chain for a contact
MIN_DOMAIN = 30            # residues (adk's NMP domain is 30)
MIN_SEGMENT = 10           # residues of a piece left on either side of a middle cut
SIZE_EXPONENT = 0.43       # PDP
MAX_SPLIT_SCORE = 0.5      # a split scoring more is not clearly a domain boundary
MAX_DOMAINS = 4            # per chain


@dataclass
class Domain:
    chain: str
    residues: np.ndarray       # model residue indices, in chain order
    score: float               # score of the split that made it (nan: the whole chain)


def contact_matrix(ca: np.ndarray, cutoff: float = CONTACT_CUTOFF,
                   min_separation: int = MIN_SEPARATION) -> np.ndarray:
    """(n, n) float 0/1: C-alphas ca (in chain order) within cutoff and min_separation apart."""
    from scipy.spatial import cKDTree

    n = len(ca)
    c = np.zeros((n, n))
    pairs = cKDTree(ca).query_pairs(cutoff, output_type="ndarray")
    if len(pairs):
        pairs = pairs[pairs[:, 1] - pairs[:, 0] >= min_separation]
        c[pairs[:, 0], pairs[:, 1]] = 1.0
        c[pairs[:, 1], pairs[:, 0]] = 1.0
    return c


def best_split(contacts: np.ndarray, min_domain: int = MIN_DOMAIN, min_segment: int = MIN_SEGMENT,
               exponent: float = SIZE_EXPONENT) -> tuple[float, np.ndarray | None]:
    """The lowest-scoring split of the n items of `contacts` (in chain order) into a piece
    [i, j) and the rest (module docstring); (score, bool mask of the piece), or (inf, None)
    when no split is allowed. Every split at once from the 2-D cumulative sums of the matrix."""
    n = len(contacts)
    s = np.zeros((n + 1, n + 1))
    s[1:, 1:] = contacts.cumsum(0).cumsum(1)
    deg = np.concatenate(([0.0], contacts.sum(axis=1).cumsum()))
    i, j = np.triu_indices(n + 1, 1)
    n_a = j - i
    n_b = n - n_a
    ok = ((n_a >= min_domain) & (n_b >= min_domain) & ((i == 0) | (i >= min_segment))
          & ((j == n) | (n - j >= min_segment)))
    if not ok.any():
        return float("inf"), None
    i, j, n_a, n_b = i[ok], j[ok], n_a[ok], n_b[ok]
    inside = s[j, j] - s[i, j] - s[j, i] + s[i, i]          # twice the contacts within [i, j)
    across = deg[j] - deg[i] - inside
    score = across / (n_a.astype(np.float64) * n_b) ** exponent
    k = int(np.argmin(score))          # the first of equal scores: deterministic
    mask = np.zeros(n, dtype=bool)
    mask[i[k]:j[k]] = True
    return float(score[k]), mask


def split_chain(ca: np.ndarray, max_score: float = MAX_SPLIT_SCORE, max_domains: int = MAX_DOMAINS,
                min_domain: int = MIN_DOMAIN, cutoff: float = CONTACT_CUTOFF) -> list[tuple[np.ndarray, float]]:
    """Domains of one chain from its C-alphas (chain order): (positions into ca, score of the
    split that made it), by recursive bisection, the best-scoring split of any domain first."""
    contacts = contact_matrix(ca, cutoff)

    def entry(pos, score):
        best, mask = best_split(contacts[np.ix_(pos, pos)], min_domain)
        return pos, score, best, mask

    domains = [entry(np.arange(len(ca)), float("nan"))]
    while len(domains) < max_domains:
        k = min(range(len(domains)), key=lambda d: domains[d][2])
        pos, _, best, mask = domains[k]
        if mask is None or not best < max_score:
            break
        domains[k:k + 1] = [entry(pos[mask], best), entry(pos[~mask], best)]
    out = [(pos, score) for pos, score, _, _ in domains]
    out.sort(key=lambda t: int(t[0].min()))
    return out


def _ranges(model, residues: np.ndarray) -> str:
    """"A:1-29,A:60-121" for residues (model indices, chain order): runs of consecutive indices."""
    parts = []
    start = prev = int(residues[0])
    for r in [*residues[1:].tolist(), None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        lo, hi = model.res_seqid[start], model.res_seqid[prev]
        parts.append(f"{model.res_chain[start]}:{lo}" if start == prev else f"{model.res_chain[start]}:{lo}-{hi}")
        if r is not None:
            start = prev = r
    return ",".join(parts)


def find_domains(model, max_score: float = MAX_SPLIT_SCORE, max_domains: int = MAX_DOMAINS,
                 min_domain: int = MIN_DOMAIN) -> list[Domain]:
    """The domains of every chain of the model at its own coordinates (module docstring), in
    chain order; every residue of the model in exactly one."""
    res_chain = np.asarray(model.res_chain)
    ca_atom = np.full(model.n_residues, -1)
    is_ca = (model.atom_name == "CA") & (model.element == "C")
    for a in np.flatnonzero(is_ca):
        r = model.res_index[a]
        if model.res_is_polymer[r] and ca_atom[r] < 0:
            ca_atom[r] = a
    out = []
    for chain in dict.fromkeys(res_chain.tolist()):
        residues = np.flatnonzero(res_chain == chain)
        with_ca = residues[ca_atom[residues] >= 0]
        if len(with_ca) < 2 * min_domain:
            out.append(Domain(chain, residues, float("nan")))
            continue
        parts = split_chain(model.xyz[ca_atom[with_ca]], max_score, max_domains, min_domain)
        owner = np.empty(len(residues), dtype=np.int64)
        where = np.searchsorted(residues, with_ca)
        for d, (pos, _) in enumerate(parts):
            owner[where[pos]] = d
        rest = np.flatnonzero(ca_atom[residues] < 0)
        if len(rest):                        # residues without a C-alpha: the nearest C-alpha's domain
            from scipy.spatial import cKDTree
            first = model.res_first_atom[residues[rest]]
            _, near = cKDTree(model.xyz[ca_atom[with_ca]]).query(model.xyz[first])
            owner[rest] = owner[where[near]]
        out.extend(Domain(chain, residues[owner == d], score) for d, (_, score) in enumerate(parts))
    return out


def domain_groups(model) -> list[np.ndarray]:
    """Atom index arrays of the domains find_domains finds (rigid.parse_groups with "auto"),
    each domain's residue ranges logged."""
    domains = find_domains(model)
    first = np.asarray(model.res_first_atom)
    log.info("rigid groups: %d domain(s) found in %d chain(s)", len(domains),
             len({d.chain for d in domains}))
    for d in domains:
        how = "whole chain" if np.isnan(d.score) else f"split score {d.score:.2f}"
        log.info("  domain %s (%d residues, %s)", _ranges(model, d.residues), len(d.residues), how)
    return [np.concatenate([np.arange(first[r], first[r + 1]) for r in d.residues]).astype(np.int64)
            for d in domains]
