"""Measures automatic domain detection (hpcrefine.protocol.domains, `--rigid-groups auto`).

On adenylate kinase, open (4AKE) and closed (1AKE), against the known domains CORE (1-29,
60-121, 160-214), NMP (30-59) and LID (122-159): the detected domains, and per known domain the
overlap (Jaccard: shared residues over residues in either) with the detected domain matched to
it one to one (the matching with most residues in agreement), and the fraction of all residues
in their matched domain. On 7cth (dengue virus E protein, chains A-C; M protein, D-F; the scFv
VH and VL of an antibody, H and I, one Ig domain each): the domains of every chain. With
--scores, the best split score of every domain found (the numbers behind MAX_SPLIT_SCORE).

    python scripts/bench_domains.py [--scores]
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from hpcrefine import datasets
from hpcrefine.modelio import read_model
from hpcrefine.protocol import domains as dm

ADK = {"CORE": [(1, 29), (60, 121), (160, 214)], "NMP": [(30, 59)], "LID": [(122, 159)]}


def known_sets(model, known: dict) -> dict:
    num = np.array([int(s) for s in model.res_seqid])
    return {name: set(np.flatnonzero(np.any([(num >= lo) & (num <= hi) for lo, hi in spans], axis=0)).tolist())
            for name, spans in known.items()}


def overlaps(found: list[set], known: dict) -> tuple[dict, float]:
    """Per known domain the Jaccard overlap with its one-to-one matched found domain (0 when
    unmatched), and the fraction of residues in agreement under that matching."""
    names = list(known)
    k = max(len(found), len(names))
    padded = found + [set()] * (k - len(found))
    best, best_perm = -1, None
    for perm in itertools.permutations(range(k), len(names)):
        agree = sum(len(known[n] & padded[p]) for n, p in zip(names, perm))
        if agree > best:
            best, best_perm = agree, perm
    total = sum(len(v) for v in known.values())
    out = {}
    for n, p in zip(names, best_perm):
        union = known[n] | padded[p]
        out[n] = len(known[n] & padded[p]) / len(union)
    return out, best / total


def describe(model, doms) -> str:
    return " | ".join(dm._ranges(model, d.residues) for d in doms)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scores", action="store_true", help="print each domain's best further split score")
    args = ap.parse_args()
    paths = datasets.fetch(["adk_open", "adk_closed", "7cth"])
    for name in ("adk_open", "adk_closed"):
        model = read_model(paths[name])
        doms = dm.find_domains(model)
        ov, frac = overlaps([set(d.residues.tolist()) for d in doms], known_sets(model, ADK))
        print(f"{name}: {len(doms)} domains: {describe(model, doms)}")
        print("  overlap (Jaccard) " + ", ".join(f"{k} {v:.3f}" for k, v in ov.items())
              + f"; residues in their domain {100 * frac:.1f} %")
        if args.scores:
            print_scores(model, doms)
    model = read_model(paths["7cth"])
    doms = dm.find_domains(model)
    for chain in dict.fromkeys(d.chain for d in doms):
        mine = [d for d in doms if d.chain == chain]
        print(f"7cth chain {chain}: {len(mine)} domain(s): {describe(model, mine)}")
        if args.scores:
            print_scores(model, mine)


def print_scores(model, doms) -> None:
    for d in doms:
        ca = [a for r in d.residues for a in range(model.res_first_atom[r], model.res_first_atom[r + 1])
              if model.atom_name[a] == "CA"]
        best, mask = dm.best_split(dm.contact_matrix(model.xyz[ca]))
        print(f"    {dm._ranges(model, d.residues)}: made by a split scoring {d.score:.3f}, "
              f"best further split {best:.3f}")


if __name__ == "__main__":
    main()
