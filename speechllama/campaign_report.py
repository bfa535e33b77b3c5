"""The accuracy campaign's write-up: the results table and the real-speech WER figure.

``render`` rewrites only the part of ``docs/accuracy.md`` between the generated-table markers,
so the hand-written prose around it survives every re-render.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechllama.resultlog import write_text_atomic

START = "<!-- campaign-table:start -->"
END = "<!-- campaign-table:end -->"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def _nats(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _sets(results: Sequence[dict[str, Any]]) -> list[str]:
    """Eval set names in first-seen order."""
    seen: dict[str, None] = {}
    for row in results:
        seen.update(dict.fromkeys(row["wer"]))
    return list(seen)


def table(results: Sequence[dict[str, Any]]) -> str:
    """One markdown row per run: what changed, how much data and time, WER (%) and reference
    cross-entropy (nats/token; "—" for rows scored before it was recorded) per set, and the
    per-source WER of sets that have several sources (e.g. real-smoke)."""
    sets = _sets(results)
    sources = {s: sorted({k for r in results for k in r.get("by_source", {}).get(s, {})})
               for s in sets}  # fmt: skip
    head = ["run", "lever", "filter", "extra args", "hours", "steps", "train s", "dev CE"]
    head += [f"WER {s}" for s in sets]
    head += [f"CE {s}" for s in sets]
    head += [f"{s}: {k}" for s in sets for k in sources[s]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        ce = r.get("dev_ce")
        cells = [r["name"], r["lever"], f"`{r['filter']}`", f"`{r['extra']}`" if r["extra"] else "",
                 f"{r['hours']:.2f}", str(r["steps"]), f"{r['train_seconds']:.0f}",
                 "—" if ce is None else f"{ce:.3f}"]  # fmt: skip
        cells += [_pct(r["wer"].get(s)) for s in sets]
        cells += [_nats(r.get("ce", {}).get(s)) for s in sets]
        cells += [_pct(r.get("by_source", {}).get(s, {}).get(k)) for s in sets for k in sources[s]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], sets: Sequence[str], path: Path) -> None:
    """Grouped bars of every run on each of ``sets`` (the real-speech sets), runs labelled
    "name (lever)": greedy WER (%) above, and below the reference cross-entropy (the panel
    that separates runs whose WERs all sit near 90%) minus the ``baseline`` run's where there
    is one, so that a lever's 0.05 nats show beside sets whose CE differs by 4."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise OSError(f"{path}: plotting needs matplotlib (pip install matplotlib)") from err
    sets = [s for s in sets if any(s in r["wer"] for r in results)] or _sets(results)
    fig = Figure(figsize=(max(6.0, 0.6 * len(results) * max(1, len(sets)) + 2), 8.0))
    FigureCanvasAgg(fig)
    wer_ax, ce_ax = fig.subplots(2, 1, sharex=True)
    width = 0.8 / max(1, len(sets))
    nan = float("nan")
    base = next((r.get("ce", {}) for r in results if r["name"] == "baseline"), {})
    for j, name in enumerate(sets):
        xs = [i + (j - (len(sets) - 1) / 2) * width for i in range(len(results))]
        wer_ax.bar(xs, [100 * r["wer"].get(name, nan) for r in results], width, label=name)
        ce = [r.get("ce", {}).get(name, nan) - base.get(name, 0.0) for r in results]
        ce_ax.bar(xs, ce, width, label=name)
    ce_ax.set_xticks(range(len(results)))
    ce_ax.set_xticklabels([f"{r['name']}\n({r['lever']})" for r in results], rotation=45,
                          ha="right", fontsize=8)  # fmt: skip
    wer_ax.set_ylabel("WER (%)")
    ce_ax.set_ylabel("CE minus baseline's (nats/token)" if base else "CE (nats/token)")
    ce_ax.axhline(0.0, color="black", linewidth=0.8)
    wer_ax.set_title("Accuracy campaign on real speech, per run (greedy WER; teacher-forced CE)")
    wer_ax.legend()
    for ax in (wer_ax, ce_ax):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def render(results: Sequence[dict[str, Any]], doc: Path, png: Path, sets: Sequence[str]) -> None:
    """Put ``table(results)`` between the markers of ``doc`` and draw ``png``."""
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError as exc:
        raise OSError(f"{doc}: {exc.strerror or exc}") from exc
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{doc}: no {START} ... {END} markers to put the table between")
    body = table(results) if results else "(no finished run yet)\n"
    write_text_atomic(doc, text[: start + len(START)] + "\n" + body + text[end:])
    if results:
        plot(results, sets, png)
