"""PNG plots of a validation result: map-model FSC, per-residue CC along the chains, Ramachandran.

Drawn with matplotlib's Agg backend (no display). Plots stay readable at any model size:
  * per-residue CC: up to MAX_CHAIN_PANELS chains as one line plot each; beyond that, a heat map
    (one row per chain, residues along x by position in the chain, colour = CC) above a plot of
    each chain's mean CC, so hundreds of chains fit one figure;
  * Ramachandran: one panel per residue class, the Top8000 favoured and allowed regions as
    filled contours and the residues as points (outliers in red and, up to 20, labelled);
    rasterised so that 100,000 points still make a small file.
"""
from __future__ import annotations

import os

import numpy as np

from . import ramachandran

MAX_CHAIN_PANELS = 8


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_fsc(result: dict, path: str) -> None:
    plt = _plt()
    mp = result["map"]
    s = np.array(mp["fsc_curve"]["s"])
    f = np.array(mp["fsc_curve"]["fsc"])
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(s[1:], f[1:], label=f"model vs map (FSC_avg {mp['fsc_avg']:.3f})")
    if mp.get("half_map_fsc"):
        hs = np.array(mp["half_map_fsc"]["s"])
        hf = np.array(mp["half_map_fsc"]["fsc"])
        ax.plot(hs[1:], hf[1:], label="half map 1 vs half map 2", color="grey")
    ax.axhline(0.5, color="k", lw=0.6, ls=":")
    if result.get("resolution"):
        ax.axvline(1.0 / result["resolution"], color="grey", lw=0.8, ls="--",
                   label=f"resolution {result['resolution']} A")
    ax.set_xlabel("spatial frequency s (1/A)")
    ax.set_ylabel("FSC")
    ax.set_ylim(min(-0.05, float(np.nanmin(f[1:])) - 0.05) if len(f) > 1 else -0.05, 1.02)
    top = ax.secondary_xaxis("top", functions=(lambda x: 1.0 / np.maximum(x, 1e-3),
                                                 lambda d: 1.0 / np.maximum(d, 1e-3)))
    top.set_xlabel("resolution (A)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_residue_cc(result: dict, path: str) -> None:
    plt = _plt()
    p = result["per_residue"]
    chains = p["chain"]
    cc = p["cc"]
    names, first = np.unique(chains, return_index=True)
    names = names[np.argsort(first)]
    if len(names) <= MAX_CHAIN_PANELS:
        fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.6 + 1.3 * len(names)), squeeze=False)
        for ax, c in zip(axes[:, 0], names):
            sel = np.nonzero(chains == c)[0]
            ax.plot(np.arange(len(sel)), cc[sel], lw=0.8)
            ax.set_ylim(min(0.0, float(np.nanmin(cc[sel])) if np.isfinite(cc[sel]).any() else 0.0), 1.0)
            ax.set_ylabel(f"chain {c}\nCC", fontsize=8)
            step = max(1, len(sel) // 12)
            ax.set_xticks(np.arange(0, len(sel), step))
            ax.set_xticklabels(p["seqid"][sel][::step], fontsize=7)
        axes[-1, 0].set_xlabel("residue")
    else:
        rows = [np.nonzero(chains == c)[0] for c in names]
        width = max(len(r) for r in rows)
        grid = np.full((len(rows), width), np.nan)
        for k, r in enumerate(rows):
            grid[k, :len(r)] = cc[r]
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10, 8), gridspec_kw={"height_ratios": [3, 1]})
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0, vmax=1.0)
        ax.set_ylabel(f"chain ({len(names)} chains, in file order)")
        ax.set_xlabel("residue position in chain")
        fig.colorbar(im, ax=ax, label="per-residue CC")
        means = np.array([np.nanmean(cc[r]) if np.isfinite(cc[r]).any() else np.nan for r in rows])
        ax2.plot(np.arange(len(names)), means, ".", ms=3)
        ax2.set_xlabel("chain index")
        ax2.set_ylabel("mean CC")
    fig.suptitle("per-residue map-model correlation")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_ramachandran(result: dict, path: str) -> None:
    plt = _plt()
    p = result["per_residue"]
    tables = ramachandran.tables()
    centres = np.arange(-179.0, 180.0, 2.0)
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.5))
    for k, ax in enumerate(axes.ravel()):
        t = tables[k].T                                     # [psi, phi] for contourf
        levels = [ramachandran.OUTLIER_CUTOFF[k], ramachandran.FAVOURED_CUTOFF, 1e9]
        ax.contourf(centres, centres, t, levels=levels, colors=["#d8e6f3", "#8fb4d9"])
        sel = p["rama_class"] == k
        cat = p["rama_category"][sel]
        phi, psi = p["phi"][sel], p["psi"][sel]
        ok = cat > 0
        ax.scatter(phi[ok], psi[ok], s=3, c="k", lw=0, rasterized=True)
        bad = cat == 0
        ax.scatter(phi[bad], psi[bad], s=12, c="red", lw=0, rasterized=True)
        labels = [f"{c}/{n}{s}" for c, n, s in zip(p["chain"][sel][bad], p["resname"][sel][bad],
                                                    p["seqid"][sel][bad])]
        for x, y, lab in list(zip(phi[bad], psi[bad], labels))[:20]:
            ax.annotate(lab, (x, y), fontsize=6, color="red")
        n = int(sel.sum())
        pct = 100.0 * bad.sum() / n if n else 0.0
        ax.set_title(f"{ramachandran.CLASSES[k]}: {n} residues, {int(bad.sum())} outliers ({pct:.1f}%)",
                     fontsize=9)
        ax.set_xlim(-180, 180)
        ax.set_ylim(-180, 180)
        ax.set_xticks(range(-180, 181, 90))
        ax.set_yticks(range(-180, 181, 90))
        ax.set_xlabel("phi")
        ax.set_ylabel("psi")
    fig.suptitle("Ramachandran plot (Top8000: dark = favoured, light = allowed)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(result: dict, outdir: str, prefix: str = "validation") -> list[str]:
    """Write the plots that apply; returns their paths (atomically, via .part files)."""
    jobs = [(plot_ramachandran, f"{prefix}_ramachandran.png")]
    if result.get("map"):
        jobs += [(plot_fsc, f"{prefix}_fsc.png"), (plot_residue_cc, f"{prefix}_residue_cc.png")]
    paths = []
    for fn, name in jobs:
        path = os.path.join(outdir, name)
        tmp = path + ".part.png"
        fn(result, tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths
