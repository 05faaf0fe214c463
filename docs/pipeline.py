"""Draws docs/pipeline.svg, the MSA layer's stages and the data between them:

    python docs/pipeline.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402

STAGE = dict(boxstyle="round,pad=0.02", fc="#dbe9f6", ec="#2b5d8a", lw=1.2)
DATA = dict(boxstyle="round,pad=0.02", fc="#f4f4f4", ec="#888888", lw=0.8)
DECODE = dict(boxstyle="round,pad=0.02", fc="#e7f3e2", ec="#3f7a32", lw=1.2)


def box(ax, x, y, w, h, text, style, size=7.5):
    ax.add_patch(FancyBboxPatch((x, y), w, h, **style))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, wrap=True)


def arrow(ax, x0, y0, x1, y1):
    ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.0, color="#444444"))


def main():
    fig, ax = plt.subplots(figsize=(13, 5.2))
    ax.set_xlim(0, 12.2)
    ax.set_ylim(0, 5.2)
    ax.axis("off")
    # prefill row
    ax.text(0.1, 4.95, "prefill (more than 8 queries per sequence on average)", fontsize=9, weight="bold")
    box(ax, 0.1, 3.5, 1.5, 1.0, "q_idx [T, Hkv, Di]\nk_idx [S, Di]", DATA)
    box(ax, 1.9, 3.5, 1.9, 1.0, "select\nindex scores, block max,\nforcing, top-k\n(select.mojo)", STAGE)
    box(ax, 4.1, 3.5, 1.5, 1.0, "block_ids\n[Hkv, T, topk]\nquery-major", DATA)
    box(ax, 5.9, 3.5, 1.9, 1.0, "invert\nblock -> queries CSR,\nwork list (forced\nblocks left out)", STAGE)
    box(ax, 8.1, 3.5, 1.7, 1.0, "work list\n(g, row, begin, count)\n<= q_budget each", DATA)
    box(ax, 10.1, 3.5, 2.0, 1.0, "block attention\none K/V block per item,\nits queries streamed\n(attention.mojo)", STAGE)
    box(ax, 10.1, 1.9, 2.0, 1.0, "o_partial [T, Hq, topk, D]\nlse_partial [T, Hq, topk]\none per (query, head,\nselected block)", DATA)
    box(ax, 7.5, 1.9, 2.2, 1.0, "forced pass\nsinks + local blocks\nquery-major, merged with\nthe partials (forced.mojo)", STAGE)
    box(ax, 5.7, 1.9, 1.5, 1.0, "out [T, Hq, D]\nlse [T, Hq]", DATA)
    box(ax, 0.1, 1.9, 1.5, 1.0, "q [T, Hq, D]\nk, v [S, Hkv, D]", DATA)
    for x0, x1 in ((1.6, 1.9), (3.8, 4.1), (5.6, 5.9), (7.8, 8.1), (9.8, 10.1)):
        arrow(ax, x0, 4.0, x1, 4.0)
    arrow(ax, 11.1, 3.5, 11.1, 2.9)
    arrow(ax, 10.1, 2.4, 9.7, 2.4)
    arrow(ax, 7.5, 2.4, 7.2, 2.4)
    arrow(ax, 1.6, 2.7, 10.1, 3.6)
    arrow(ax, 1.6, 2.1, 7.5, 2.1)
    # decode row
    ax.text(0.1, 1.45, "decode and speculative decode (at most 8 new queries per sequence on average)", fontsize=9,
            weight="bold")
    box(ax, 1.9, 0.2, 2.5, 1.0, "decode select\nscores split over the keys\n(k_idx read once), top-k\n(decode.mojo)",
        DECODE)
    box(ax, 4.9, 0.2, 1.4, 1.0, "block_ids", DATA)
    box(ax, 6.8, 0.2, 2.9, 1.0, "decode attention\nquery-major split-K over the\nselected blocks, merged in the\nkernel "
        "(decode_attention.mojo)", DECODE)
    box(ax, 10.2, 0.2, 1.5, 1.0, "out, lse", DATA)
    arrow(ax, 4.4, 0.7, 4.9, 0.7)
    arrow(ax, 6.3, 0.7, 6.8, 0.7)
    arrow(ax, 9.7, 0.7, 10.2, 0.7)
    out = Path(__file__).with_name("pipeline.svg")
    fig.savefig(out, format="svg", bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
