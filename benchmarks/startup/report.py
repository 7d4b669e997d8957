"""Turning run results into the table (stdout, README), the JSON summary and the stacked bar chart.

The table has one section per image group (the tuning set the fetch heuristics were designed on,
then the held-out images a fetch-policy change is judged on) and, in the lazy modes, one block
of columns per store variant: the first variant (our defaults) against each of the others (the
Go-like baseline), with issue 13's targets checked where the other one is a baseline.
"""
from __future__ import annotations

import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .runner import LAZY_MODES

log = logging.getLogger(__name__)

GROUP_TITLES = {
    "tuning": "Tuning set: the fetch heuristics were designed and measured on these",
    "held-out": "Held-out: nothing was tuned on these; a fetch-policy change is judged here",
}

# Go stargz-store 0.12.0 on similar images, 100 Mbit/s / 20 ms, median of 3 (issue 6): total seconds.
# Its optimized images were converted with the strace record: the reference of both optimized modes.
GO_REFERENCE = {
    ("python", "legacy"): 29.96, ("python", "estargz-noopt"): 12.50, ("python", "estargz"): 5.23,
    ("python", "warm"): 0.35,
    ("toolchain", "legacy"): 16.64, ("toolchain", "estargz-noopt"): 4.16, ("toolchain", "estargz"): 2.86,
    ("toolchain", "warm"): 0.13,
    ("bigdata", "legacy"): 45.61, ("bigdata", "estargz-noopt"): 0.75, ("bigdata", "estargz"): 0.75,
    ("bigdata", "warm"): 0.10,
}
GO_REFERENCE.update({(image, "estargz-strace"): GO_REFERENCE[(image, "estargz")]
                     for image in ("python", "toolchain", "bigdata")})

# issue 13: against the baseline, every lazy mode at least 10% faster, at most 1.2x the needed bytes,
# and the store's peak RSS at or below the baseline's and under 150 MB
TIME_FACTOR = 0.9
FETCH_FACTOR = 1.2
RSS_LIMIT_MB = 150.0


@dataclass
class Summary:
    """One (link, image, mode, store variant): the median run's pull/create/run/total (by total), min and
    max of the totals, and medians of the byte, request and daemon figures."""

    link: str
    image: str
    mode: str
    config: str  # store variant ("" for the modes without a store)
    group: str
    runs: int
    failed: int
    pull: float
    create: float
    run: float
    total: float
    total_min: float
    total_max: float
    mb_first_output: float  # IP bytes from the registry side until the first output line
    mb_total: float  # HTTP body bytes the registry served up to workload exit
    gets_first_output: float | None  # blob GETs the registry completed before the first output line
    gets_total: float | None
    daemon_cpu_s: float | None
    daemon_rss_mb: float | None
    store_requests: float | None = None  # the store's own request counter at exit
    mb_needed: float | None = None  # compressed chunks of the files the workload reads, plus TOCs
    mb_background: float | None = None  # of the store's fetched bytes (at exit), what background fetch brought

    @property
    def ok(self) -> bool:
        return self.runs > self.failed

    @property
    def fetch_ratio(self) -> float | None:
        return self.mb_first_output / self.mb_needed if self.mb_needed else None

    def to_json(self) -> dict:
        return dict(self.__dict__, fetch_ratio=self.fetch_ratio)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _median_or_none(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: list[dict], needed_bytes: Mapping[str, int | None] | None = None,
              groups: Mapping[str, str] | None = None) -> list[Summary]:
    """Per (link, image, mode, variant); `needed_bytes` by "image:mode" (see needed.py) adds the fetch
    ratio, `groups` maps an image to its group (an image not in it counts as held-out)."""
    needed_bytes = needed_bytes or {}
    groups = groups or {}
    grouped: dict[tuple[str, str, str, str], list[dict]] = {}
    for r in results:
        grouped.setdefault((r["link"], r["image"], r["mode"], r.get("config", "")), []).append(r)
    summaries = []
    for (link, image, mode, config), rs in grouped.items():
        ok = [r for r in rs if r["ok"]]
        totals = [r["total_s"] for r in ok]
        # the median run by total (lower middle for an even count), so pull + create + run add up to it
        by_total = sorted(ok, key=lambda r: r["total_s"])
        median_run = by_total[(len(by_total) - 1) // 2] if by_total else None
        nan = float("nan")
        rss = _median_or_none([r.get("daemon_peak_rss_bytes") for r in ok])
        summaries.append(Summary(
            link, image, mode, config, groups.get(image, "held-out"), len(rs), len(rs) - len(ok),
            median_run["pull_s"] if median_run else nan, median_run["create_s"] if median_run else nan,
            median_run["run_s"] if median_run else nan, median_run["total_s"] if median_run else nan,
            min(totals) if totals else nan, max(totals) if totals else nan,
            _median([r["link_bytes_first_output"] / 1e6 for r in ok]),
            _median([r["registry_bytes"] / 1e6 for r in ok]),
            _median_or_none([r.get("registry_blob_gets_first_output") for r in ok]),
            _median_or_none([r.get("registry_blob_gets") for r in ok]),
            _median_or_none([r.get("daemon_cpu_s") for r in ok]),
            _mb_or_none(rss),
            _median_or_none([r.get("store_requests") for r in ok]),
            (needed_bytes.get(f"{image}:{mode}") or 0) / 1e6 or None,
            _mb_or_none(_median_or_none([r.get("store_background_bytes") for r in ok])),
        ))
    return summaries


def _mb_or_none(value: float | None) -> float | None:
    return value / 1e6 if value is not None else None


def _num(value: float | None, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _total(s: Summary | None) -> str:
    if s is None:
        return ""
    if not s.ok:
        return f"failed ({s.failed}/{s.runs})"
    failed = f", {s.failed} failed" if s.failed else ""
    return f"**{s.total:.2f}** ({s.total_min:.2f}–{s.total_max:.2f}{failed})"


def is_baseline(config: str) -> bool:
    return config.startswith("baseline")


def missed_targets(primary: Summary, baseline: Summary) -> list[str]:
    """Issue 13's targets `primary` misses against `baseline` (both successful lazy summaries)."""
    missed = []
    if not primary.total <= TIME_FACTOR * baseline.total:
        missed.append("time")
    if primary.fetch_ratio is None or primary.fetch_ratio > FETCH_FACTOR:
        missed.append("bytes")
    if (primary.daemon_rss_mb is None or baseline.daemon_rss_mb is None
            or primary.daemon_rss_mb > baseline.daemon_rss_mb or primary.daemon_rss_mb >= RSS_LIMIT_MB):
        missed.append("RSS")
    return missed


def _index(summaries: list[Summary]) -> dict[tuple[str, str, str, str], Summary]:
    return {(s.link, s.image, s.mode, s.config): s for s in summaries}


def configs_of(summaries: list[Summary]) -> list[str]:
    """The store variants in first-seen order (the first is the one the others are compared with)."""
    return list(dict.fromkeys(s.config for s in summaries if s.mode in LAZY_MODES))


def _section(rows: list[tuple[str, str]], by_key: dict, link: str, configs: list[str], reference: bool) -> list[str]:
    primary, others = (configs[0], configs[1:]) if configs else ("", [])
    header = ["image", "mode", "pull / create / run s", "total s (min–max)", "vs legacy", "MB @1st output",
              "MB needed", "fetched ÷ needed", "GETs @1st", "store RSS MB", "store CPU s"]
    for other in others:
        header += [f"{other}: total s (min–max)", f"{primary} ÷ {other}", f"{other}: MB @1st", f"{other}: GETs @1st",
                   f"{other}: RSS MB"]
        if is_baseline(other):
            header.append(f"issue 13 vs {other}")
    if reference:
        header.append("Go 0.12.0 total s")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    previous_image = None
    for image, mode in rows:
        lazy = mode in LAZY_MODES
        s = by_key.get((link, image, mode, primary if lazy else ""))
        legacy = by_key.get((link, image, "legacy", ""))
        cells = [image if image != previous_image else "", mode]
        previous_image = image
        if s is None or not s.ok:
            cells += ["", _total(s)] + [""] * (len(header) - 4)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        speedup = (f"{legacy.total / s.total:.1f}x" if legacy and legacy.ok and mode != "legacy" and s.total > 0
                   else "")
        cells += [f"{s.pull:.2f} / {s.create:.2f} / {s.run:.2f}", _total(s), speedup, f"{s.mb_first_output:.1f}",
                  _num(s.mb_needed, ".1f") if lazy else "", _num(s.fetch_ratio, ".2f") + ("x" if s.fetch_ratio else ""),
                  _num(s.gets_first_output, ".0f"), _num(s.daemon_rss_mb, ".0f"), _num(s.daemon_cpu_s, ".2f")]
        for other in others:
            o = by_key.get((link, image, mode, other)) if lazy else None
            if o is None or not o.ok:
                cells += [_total(o), "", "", "", ""] + ([""] if is_baseline(other) else [])
                continue
            ratio = s.total / o.total if o.total > 0 else None
            cells += [_total(o), _num(ratio, ".2f"), f"{o.mb_first_output:.1f}", _num(o.gets_first_output, ".0f"),
                      _num(o.daemon_rss_mb, ".0f")]
            if is_baseline(other):
                missed = missed_targets(s, o)
                cells.append("met" if not missed else "missed: " + ", ".join(missed))
        if reference:
            cells.append(_num(GO_REFERENCE.get((image, mode)), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def group_verdicts(summaries: list[Summary], link: str, group: str) -> dict[str, dict]:
    """Per lazy mode, how the first variant fares against the first baseline variant over a group's images."""
    configs = configs_of(summaries)
    baselines = [c for c in configs[1:] if is_baseline(c)]
    if not configs or not baselines:
        return {}
    primary, baseline = configs[0], baselines[0]
    by_key = _index(summaries)
    out: dict[str, dict] = {}
    images = list(dict.fromkeys(s.image for s in summaries if s.link == link and s.group == group))
    for mode in LAZY_MODES:
        pairs = [(by_key.get((link, i, mode, primary)), by_key.get((link, i, mode, baseline))) for i in images]
        pairs = [(p, b) for p, b in pairs if p is not None and b is not None and p.ok and b.ok and b.total > 0]
        if not pairs:
            continue
        ratios = [p.total / b.total for p, b in pairs]
        out[mode] = {
            "primary": primary, "baseline": baseline, "images": len(pairs),
            "time_ratio_geomean": math.exp(sum(math.log(r) for r in ratios) / len(ratios)),
            "time_ratio_min": min(ratios), "time_ratio_max": max(ratios),
            "time_met": sum(1 for p, b in pairs if "time" not in missed_targets(p, b)),
            "bytes_met": sum(1 for p, b in pairs if "bytes" not in missed_targets(p, b)),
            "rss_met": sum(1 for p, b in pairs if "RSS" not in missed_targets(p, b)),
            "all_met": sum(1 for p, b in pairs if not missed_targets(p, b)),
        }
    return out


def _verdict_lines(verdicts: dict[str, dict]) -> list[str]:
    lines = []
    for mode, v in verdicts.items():
        n = v["images"]
        lines.append(
            f"- {mode}: {v['primary']} ÷ {v['baseline']} total time, geometric mean {v['time_ratio_geomean']:.2f} "
            f"({v['time_ratio_min']:.2f}–{v['time_ratio_max']:.2f}); at least 10% faster on {v['time_met']} of {n}, "
            f"fetched ≤ {FETCH_FACTOR}x needed on {v['bytes_met']} of {n}, RSS ≤ {v['baseline']}'s and "
            f"< {RSS_LIMIT_MB:.0f} MB on {v['rss_met']} of {n}; all targets on {v['all_met']} of {n}")
    return lines


def table(summaries: list[Summary], reference_link: str) -> str:
    """Markdown: per link and group, a heading, the table and the group's verdict against the baseline.

    The Go column only for the tuning set on the link (kind) its figures were taken on."""
    configs = configs_of(summaries)
    links = list(dict.fromkeys(s.link for s in summaries))
    by_key = _index(summaries)
    out: list[str] = []
    for link in links:
        for group in ("tuning", "held-out"):
            rows = list(dict.fromkeys((s.image, s.mode) for s in summaries if s.link == link and s.group == group))
            if not rows:
                continue
            images = list(dict.fromkeys(image for image, _ in rows))
            title = GROUP_TITLES.get(group, group)
            out.append(f"#### {title} ({', '.join(images)}){f' — {link} link' if len(links) > 1 else ''}")
            out.append("")
            reference = link == reference_link and group == "tuning"
            out += _section(rows, by_key, link, configs, reference)
            verdicts = _verdict_lines(group_verdicts(summaries, link, group))
            if verdicts:
                out += [""] + verdicts
            out.append("")
    return "\n".join(out).rstrip() + "\n"


_SHORT_MODE = {"legacy": "legacy", "estargz-noopt": "noopt", "estargz": "opt", "estargz-strace": "strace", "warm": "warm"}


def chart(summaries: list[Summary], out: Path, title: str) -> bool:
    """Stacked pull/create/run bars per image, mode and variant (one panel per link and group);
    False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install '.[bench]'): no chart written")
        return False
    configs = configs_of(summaries)
    panels = list(dict.fromkeys((s.link, s.group) for s in summaries))
    most = max(sum(1 for s in summaries if (s.link, s.group) == p and s.ok) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 0.32 * most + 2), 4.6 * len(panels)), squeeze=False)
    colours = {"pull": "#4c72b0", "create": "#dd8452", "run": "#55a868"}
    for ax, (link, group) in zip(axes[:, 0], panels):
        rows = [s for s in summaries if (s.link, s.group) == (link, group) and s.ok]
        x, spans, position, previous = [], {}, 0.0, None
        for s in rows:
            if previous is not None and s.image != previous:
                position += 0.8
            x.append(position)
            spans.setdefault(s.image, []).append(position)
            previous = s.image
            position += 1.0
        bottom = [0.0] * len(rows)
        for part in ("pull", "create", "run"):
            values = [getattr(s, part) for s in rows]
            ax.bar(x, values, bottom=bottom, color=colours[part], label=part, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values)]
        err_low = [max(0.0, s.total - s.total_min) for s in rows]
        err_high = [max(0.0, s.total_max - s.total) for s in rows]
        ax.errorbar(x, bottom, yerr=[err_low, err_high], fmt="none", ecolor="black", capsize=2, linewidth=1)
        for xi, total in zip(x, bottom):
            ax.text(xi, total, f"{total:.1f}", ha="center", va="bottom", fontsize=6)
        labels = [_SHORT_MODE.get(s.mode, s.mode) + ("" if not s.config or s.config == configs[0] else f" [{s.config}]")
                  for s in rows]
        ax.set_xticks(x)
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=6)
        for image, positions in spans.items():
            ax.text(sum(positions) / len(positions), 1.01, image, ha="center", va="bottom", fontsize=8,
                    fontweight="bold", transform=ax.get_xaxis_transform())
        ax.set_ylabel("seconds (median; whiskers: min–max of total)")
        ax.set_title(f"{group} — {link}", fontsize=9, pad=18)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True
