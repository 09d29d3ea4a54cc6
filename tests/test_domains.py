"""Automatic domain detection (hpcrefine.protocol.domains, `--rigid-groups auto`): the split of a
contact matrix on made-up blocks, the three domains of adenylate kinase open (CORE, NMP, LID) and
the LID of the closed form, one domain for each single Ig domain of 7cth (the scFv VH and VL
chains H, I, L, M), and parse_groups("auto") covering every atom once."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from hpcrefine import datasets
from hpcrefine.modelio import read_model
from hpcrefine.protocol import domains as dm
from hpcrefine.protocol.rigid import parse_groups

ADK = {"CORE": [(1, 29), (60, 121), (160, 214)], "NMP": [(30, 59)], "LID": [(122, 159)]}


def _known(model, name) -> set:
    num = np.array([int(s) for s in model.res_seqid])
    return set(np.flatnonzero(np.any([(num >= lo) & (num <= hi) for lo, hi in ADK[name]], axis=0)).tolist())


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b)


def _best_match(found, known: set) -> float:
    return max(_jaccard(set(d.residues.tolist()), known) for d in found)


@pytest.fixture(scope="module")
def adk_models():
    paths = datasets.fetch(["adk_open", "adk_closed"])
    return {name: read_model(p) for name, p in paths.items()}


def test_split_of_blocks_without_contacts_between_them():
    """Two blocks of residues in contact only within themselves: the split separates them at
    score 0, also when one block is two sequence segments around the other."""
    def blocks(labels):
        labels = np.asarray(labels)
        c = (labels[:, None] == labels[None, :]).astype(float)
        np.fill_diagonal(c, 0.0)
        return c
    score, mask = dm.best_split(blocks([0] * 40 + [1] * 50))
    first = np.arange(90) < 40
    assert score == 0.0 and (np.array_equal(mask, first) or np.array_equal(mask, ~first))
    score, mask = dm.best_split(blocks([0] * 20 + [1] * 40 + [0] * 40))
    assert score == 0.0 and np.array_equal(np.flatnonzero(mask), np.arange(20, 60))
    # all in contact with all: every split scores far above the limit, none is taken
    score, _ = dm.best_split(blocks([0] * 90))
    assert score > 10 * dm.MAX_SPLIT_SCORE
    assert len(dm.split_chain(np.random.default_rng(0).normal(size=(50, 3)))) == 1     # < 2 x 30


def test_adk_open_three_domains(adk_models):
    """adk open: CORE, NMP and LID found (Jaccard overlap 0.88, 0.66, 0.92 measured; NMP comes
    out as 31-73 against the textbook 30-59)."""
    model = adk_models["adk_open"]
    found = dm.find_domains(model)
    assert len(found) == 3
    assert _best_match(found, _known(model, "CORE")) > 0.8
    assert _best_match(found, _known(model, "NMP")) > 0.55
    assert _best_match(found, _known(model, "LID")) > 0.85
    core = max(found, key=lambda d: len(d.residues))
    assert len(core.residues) > 120 and np.all(np.diff(core.residues) >= 1)
    assert sorted(np.concatenate([d.residues for d in found]).tolist()) == list(range(model.n_residues))


def test_adk_closed_lid_found(adk_models):
    """adk closed, the NMP domain packed onto the CORE: the LID is split off (0.92 measured) and
    the rest holds all of CORE and NMP; no further split passes the limit."""
    model = adk_models["adk_closed"]
    found = dm.find_domains(model)
    assert len(found) == 2
    assert _best_match(found, _known(model, "LID")) > 0.85
    rest = set(max(found, key=lambda d: len(d.residues)).residues.tolist())
    assert len((_known(model, "CORE") | _known(model, "NMP")) - rest) <= 5


def test_single_ig_domains_stay_whole():
    """7cth: each antibody variable domain (chains H, I, L, M, 105-128 residues) is one domain;
    every residue of the model is in one domain of its own chain."""
    model = read_model(datasets.fetch(["7cth"])["7cth"])
    found = dm.find_domains(model)
    per_chain = {}
    for d in found:
        assert set(model.res_chain[d.residues].tolist()) == {d.chain}
        per_chain[d.chain] = per_chain.get(d.chain, 0) + 1
    for chain in "HILM":
        assert per_chain[chain] == 1
    assert max(per_chain.values()) <= dm.MAX_DOMAINS
    assert sorted(np.concatenate([d.residues for d in found]).tolist()) == list(range(model.n_residues))


def test_parse_groups_auto_covers_every_atom_once_and_logs_the_domains(adk_models, caplog):
    model = adk_models["adk_open"]
    with caplog.at_level(logging.INFO, logger="hpcrefine.protocol.domains"):
        groups = parse_groups("auto", model)
    assert len(groups) == 3
    assert sorted(np.concatenate(groups).tolist()) == list(range(model.n_atoms))
    text = caplog.text
    assert "3 domain(s)" in text and "A:122-156" in text
