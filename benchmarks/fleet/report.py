"""The fleet benchmark's table (Markdown) and chart (origin egress and time-to-ready against N)."""
from __future__ import annotations

import logging
import math
from pathlib import Path

from .run import RunResult

log = logging.getLogger(__name__)
MB = 1e6


def _same_run_in(results: list[RunResult], r: RunResult, mode: str) -> RunResult | None:
    for d in results:
        if (d.image, d.nodes, d.background, d.mode) == (r.image, r.nodes, r.background, mode):
            return d
    return None


def _ratio(a: float, b: float | None) -> str:
    return f"{a / b:.2f}" if b and not math.isnan(a) else "-"


def table(results: list[RunResult]) -> str:
    head = ("| image | bg | N | mode | origin MB | origin req (blob GETs 200/206) | origin ÷ direct | origin ÷ blobs "
            "| mirror MB (req) | TTR p50 s | TTR max s | TTR p50 ÷ direct | TTR p50 ÷ warm | errors |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r.image, r.background, r.nodes, ["direct", "cold", "warm"].index(r.mode))):
        d = _same_run_in(results, r, "direct")
        w = _same_run_in(results, r, "warm")
        statuses = r.origin.statuses
        blob = f"{statuses.get('200', 0)}/{statuses.get('206', 0) + statuses.get('206 multi', 0)}"
        mirror = f"{r.mirror.body_bytes / MB:.1f} ({r.mirror.requests})" if r.mirror else "-"
        errors = len(r.errors) + r.verify_failures
        lines.append(
            f"| {r.image} | {'on' if r.background else 'off'} | {r.nodes} | {r.mode} "
            f"| {r.origin.link_bytes / MB:.1f} | {r.origin.requests} ({blob}) "
            f"| {_ratio(r.origin.link_bytes, d.origin.link_bytes if d else None)} "
            f"| {r.origin.link_bytes / r.image_bytes:.2f} | {mirror} | {r.ttr_p50:.2f} | {r.ttr_max:.2f} "
            f"| {_ratio(r.ttr_p50, d.ttr_p50 if d else None)} | {_ratio(r.ttr_p50, w.ttr_p50 if w else None)} "
            f"| {errors} |")
    return "\n".join(lines)


def chart(results: list[RunResult], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed (pip install -e '.[bench]'): no chart")
        return None
    images = sorted({r.image for r in results})
    bgs = sorted({r.background for r in results})
    fig, axes = plt.subplots(2, len(images) * len(bgs), figsize=(5 * len(images) * len(bgs), 8), squeeze=False)
    for col, (image, bg) in enumerate((i, b) for i in images for b in bgs):
        for mode, style in (("direct", "o-"), ("cold", "s--"), ("warm", "^:")):
            rows = sorted((r for r in results if (r.image, r.background, r.mode) == (image, bg, mode)),
                          key=lambda r: r.nodes)
            if not rows:
                continue
            ns = [r.nodes for r in rows]
            axes[0][col].plot(ns, [r.origin.link_bytes / MB for r in rows], style, label=mode)
            axes[1][col].plot(ns, [r.ttr_p50 for r in rows], style, label=f"{mode} p50")
        some = next(r for r in results if r.image == image)
        axes[0][col].axhline(some.image_bytes / MB, color="grey", lw=0.8, label="image size")
        axes[0][col].set_title(f"{image}, background fetch {'on' if bg else 'off'}")
        axes[0][col].set_ylabel("origin egress (MB)")
        axes[1][col].set_ylabel("time-to-ready p50 (s)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("nodes")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
