"""Plots of a results file of ``run_suite.py`` (matplotlib, Agg: no display needed; PNG).

    python benchmarks/plots.py benchmarks/results/<device>.json [--out-dir benchmarks/results]

Writes, each titled with the device and the date of the results:
* ``<device>-latency-<dtype>.png``: ms per decode step at batch 1 against parameters (log-log), one
  series per implementation, the weight-read floor drawn in;
* ``<device>-throughput-<dtype>.png``: decode tokens/s against batch, one panel per model size;
* ``<device>-memory.png``: memory during generation (the traces sampled while decoding: flat is
  constant memory) and against context length for mamba-rt and the Transformer (long-context rows).
Only measured points are drawn; a panel without data says so. ``--markdown`` prints the tables for
README.md instead (every number from the file, with its device and date).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

GB = 1e9


def _plt():
    from mamba_rt._optional import require

    mpl = require("matplotlib")
    mpl.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(doc: dict, what: str) -> str:
    return f"{what}\n{doc['device'].get('name', '?')} ({doc['device'].get('kind', '?')}), {doc['updated'][:10]}"


def _timed(doc: dict, kind: str) -> list[dict]:
    return [r for r in doc["rows"] if r["kind"] == kind and r.get("median_ms")]


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, wrap=True)


def latency(doc: dict, dtype: str, plt):
    rows = [r for r in _timed(doc, "decode") if r["dtype"] == dtype and r["batch"] == 1]
    fig, ax = plt.subplots(figsize=(7, 5))
    series = defaultdict(list)
    floor = {}
    for r in rows:
        series[r["impl"]].append((r["params"], r["median_ms"]))
        if r.get("floor_ms"):
            floor[r["params"]] = r["floor_ms"]
    for impl, pts in sorted(series.items()):
        pts.sort()
        ax.plot(*zip(*pts), marker="o", label=impl)
    if floor:
        pts = sorted(floor.items())
        ax.plot(*zip(*pts), "k--", marker="_", markersize=14, label="floor: weight bytes / copy bandwidth")
    if not rows:
        _empty(ax, f"no batch-1 decode rows in {dtype}")
    ax.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per decode step (median)",
           title=_title(doc, f"Decode latency, batch 1, {dtype}"))
    ax.grid(True, which="both", alpha=0.3)
    if rows:
        ax.legend(fontsize=7)
    return fig


def throughput(doc: dict, dtype: str, plt):
    rows = [r for r in _timed(doc, "decode") if r["dtype"] == dtype]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]  # one colour per impl in every panel
    colour = {impl: cycle[i % len(cycle)] for i, impl in enumerate(sorted({r["impl"] for r in rows}))}
    configs = sorted({r["config"] for r in rows}, key=lambda c: min(r["params"] for r in rows if r["config"] == c))
    n = max(1, len(configs))
    cols = min(3, n)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(4.5 * cols, 4 * ((n + cols - 1) // cols)), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    for ax, config in zip(axes.flat, configs or [None]):
        series = defaultdict(list)
        for r in rows:
            if r["config"] == config:
                series[r["impl"]].append((r["batch"], r["tokens_per_s"]))
        for impl, pts in sorted(series.items()):
            pts.sort()
            ax.plot(*zip(*pts), marker="o", label=impl, color=colour[impl])
        if config is None:
            _empty(ax, f"no decode rows in {dtype}")
        ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title=config or "")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize=6)
    fig.suptitle(_title(doc, f"Decode throughput against batch, {dtype}"), fontsize=10)
    fig.tight_layout()
    return fig


def memory(doc: dict, plt):
    fig, (during, context) = plt.subplots(1, 2, figsize=(12, 4.5))
    traced = [r for r in _timed(doc, "decode") if r.get("memory_trace")]
    kinds = {r.get("detail", {}).get("memory_trace_kind", "memory") for r in traced}
    for r in traced:
        steps, mem = zip(*r["memory_trace"])
        during.plot(steps, [m / GB for m in mem], marker=".", label=f"{r['impl']} {r['config']} {r['dtype']} b{r['batch']}")
    if traced:  # from zero: a flat line must look flat, not zoomed into allocator noise
        during.set_ylim(0, 1.15 * max(m for r in traced for _, m in r["memory_trace"]) / GB)
    else:
        _empty(during, "no memory traces in this file")
    during.set(xlabel="tokens generated (timed decode steps)", ylabel=f"GB ({' / '.join(sorted(kinds)) or 'memory'})",
               title="During generation (sampled while decoding)")
    during.grid(True, alpha=0.3)
    if traced:
        during.legend(fontsize=6)
    series = defaultdict(list)
    for r in _timed(doc, "long_context"):
        if r["batch"] == 1 and r.get("peak_memory_bytes"):
            series[f"{r['impl']} ({r['config']}-size)"].append((r["length"], r["peak_memory_bytes"] / GB))
    for impl, pts in sorted(series.items()):
        pts.sort()
        context.plot(*zip(*pts), marker="o", label=impl)
    context.set(xscale="log", xlabel="context length (tokens in the sequence)", ylabel="GB, peak while decoding",
                title="Against context length, batch 1")
    context.grid(True, which="both", alpha=0.3)
    if series:
        context.set_ylim(bottom=0)
        context.legend(fontsize=7)
    else:
        _empty(context, "no device-memory measurements of the long-context run in this file")
    fig.suptitle(_title(doc, "Device memory"), fontsize=10)
    fig.tight_layout()
    return fig


def write_plots(results: Path, out_dir: Path) -> list[Path]:
    plt = _plt()
    doc = json.loads(Path(results).read_text())
    from mamba_rt.exporters.tensorrt_build import slug

    stem = slug(str(doc["device"].get("name", "device")))
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {f"{stem}-memory.png": memory(doc, plt)}
    for dtype in sorted({r["dtype"] for r in _timed(doc, "decode")}):
        figures[f"{stem}-latency-{dtype}.png"] = latency(doc, dtype, plt)
        figures[f"{stem}-throughput-{dtype}.png"] = throughput(doc, dtype, plt)
    written = []
    for name, fig in figures.items():
        fig.savefig(out_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
        written.append(out_dir / name)
    return written


def _pivot(rows: list[dict], cell, floor: dict | None = None) -> list[str]:
    """A markdown table: one line per model size (by parameters), one column per implementation
    (after a floor column when ``floor`` maps config -> ms)."""
    impls = sorted({r["impl"] for r in rows})
    head = ["model"] + (["floor ms"] if floor else []) + impls
    out = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for _, config in sorted({(r["params"], r["config"]) for r in rows}):
        by = {r["impl"]: r for r in rows if r["config"] == config}
        cells = [config] + ([f"{floor[config]:.3f}" if config in floor else "–"] if floor else [])
        out.append("| " + " | ".join(cells + [cell(by[i]) if i in by else "–" for i in impls]) + " |")
    return out + [""]


def markdown(doc: dict) -> str:
    """README tables: decode at batch 1 (ms, x floor), decode throughput at each batch, prefill TTFT,
    long context; measured rows only."""
    lines = [f"{doc['device'].get('name')} ({doc['device'].get('kind')}), results of {doc['updated'][:10]}", ""]
    decode = _timed(doc, "decode")
    for dtype in sorted({r["dtype"] for r in decode}):
        rows = [r for r in decode if r["dtype"] == dtype]
        one = [r for r in rows if r["batch"] == 1]
        lines += [f"**Decode, batch 1, {dtype}**: ms per step, median (x the floor)", ""]
        lines += _pivot(one, lambda r: f"{r['median_ms']:.3f}" + (f" ({r['x_floor']:.1f}x)" if r.get("x_floor") else ""),
                        floor={r["config"]: r["floor_ms"] for r in one if r.get("floor_ms")})
        for b in sorted({r["batch"] for r in rows} - {1}):
            lines += [f"**Decode, batch {b}, {dtype}**: tokens/s", ""]
            lines += _pivot([r for r in rows if r["batch"] == b], lambda r: f"{r['tokens_per_s']:,.0f}")
    prefill = _timed(doc, "prefill")
    for dtype, n in sorted({(r["dtype"], r["length"]) for r in prefill}):
        lines += [f"**Prefill of {n} tokens, batch 1, {dtype}**: time to first token, ms (tokens/s)", ""]
        lines += _pivot([r for r in prefill if (r["dtype"], r["length"]) == (dtype, n)],
                        lambda r: f"{r['median_ms']:.1f} ({r['tokens_per_s']:,.0f})")
    lc = _timed(doc, "long_context")
    if lc:
        lines += ["**Long context**: decode tokens/s and peak memory while decoding", "",
                  "| context | batch | implementation | tokens/s | ms/step | peak memory | mamba-rt / this |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        ours = {(r["length"], r["largest"]): r for r in lc if r["impl"].startswith("mamba-rt")}
        for r in sorted(lc, key=lambda r: (r["length"], r["largest"], r["impl"])):
            o = ours.get((r["length"], r["largest"]))
            ratio = f"{o['tokens_per_s'] / r['tokens_per_s']:.2f}x" if o and o is not r else ""
            mem = f"{r['peak_memory_bytes'] / GB:.2f} GB" if r.get("peak_memory_bytes") else "n/a"
            lines.append(f"| {r['length']:,} | {r['batch']}{' (largest)' if r['largest'] else ''} | {r['impl']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['median_ms']:.3f} | {mem} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results", type=Path, help="a results JSON of run_suite.py")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--markdown", action="store_true", help="print the README tables instead of plotting")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.results.read_text())))
        return 0
    for p in write_plots(args.results, args.out_dir):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
