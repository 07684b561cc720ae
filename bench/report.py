"""Results -> Markdown table, PNG plots, and the README's performance section.

    python bench/report.py [bench/results/*.json] [--plots bench/results] [--readme README.md]

Only GPU rows with timings are reported (smoke rows carry none); each table row names its
device and versions. With no such rows the README says the GPU run is pending.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def load_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [r for r in json.loads(Path(path).read_text()) if r.get("ours_ms") is not None]
    return rows


def _fmt(value, digits=3) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def markdown(rows: list[dict]) -> str:
    """One table per op; ratio = ours / baseline time (< 1: trilora is faster)."""
    if not rows:
        return "GPU run pending: no benchmark results are committed yet.\n"
    out = []
    for op in sorted({r["op"] for r in rows}):
        sel = [r for r in rows if r["op"] == op]
        extra = ["tokens_per_s", "peak_mem_gb", "baseline_peak_mem_gb", "mfu"] if op == "train_step" else ["achieved", "ceiling_pct"]
        head = ["device", "torch / triton", "mode", "shape", "rank", "ours ms", "baseline", "baseline ms", "ratio", *extra]
        out.append(f"**{op}**\n\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for r in sel:
            cells = [r["device"], f"{r['torch']} / {r['triton']}", r["mode"], "×".join(map(str, r["shape"])),
                     _fmt(r.get("rank")), _fmt(r["ours_ms"]), r["baseline"], _fmt(r.get("baseline_ms")),
                     _fmt(r.get("ratio")), *(_fmt(r.get(k)) for k in extra)]
            out.append("| " + " | ".join(map(str, cells)) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def plots(rows: list[dict], folder: Path) -> list[Path]:
    """speedup vs tokens M for lora/qlora linear; peak memory per train_step contender."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    linear = [r for r in rows if r["op"] in ("lora_linear", "qlora_linear") and r.get("ratio")]
    if linear:
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in sorted({(r["op"], r["mode"], r["baseline"], tuple(r["shape"][1:]), r["rank"]) for r in linear}):
            pts = sorted((r["shape"][0], 1 / r["ratio"]) for r in linear
                         if (r["op"], r["mode"], r["baseline"], tuple(r["shape"][1:]), r["rank"]) == key)
            ax.plot(*zip(*pts), marker="o", label=f"{key[0]} {key[1]} vs {key[2]} {key[3]} r{key[4]}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("speedup (baseline / ours)")
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.legend(fontsize=5)
        fig.tight_layout()
        made.append(folder / "speedup_vs_m.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    steps = [r for r in rows if r["op"] == "train_step"]
    if steps:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        names = ["peft_bnb"] + [r["contender"] for r in steps]
        mem = [steps[0]["baseline_peak_mem_gb"]] + [r["peak_mem_gb"] for r in steps]
        ax.bar(names, mem)
        ax.set_ylabel("peak GPU memory (GB)")
        fig.tight_layout()
        made.append(folder / "train_step_memory.png")
        fig.savefig(made[-1], dpi=120)
        plt.close(fig)
    return made


def update_readme(readme: Path, body: str) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{body}{END}{tail}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path)
    parser.add_argument("--plots", type=Path, help="folder for the PNG plots")
    parser.add_argument("--readme", type=Path, help="README whose performance section to rewrite")
    args = parser.parse_args(argv)
    paths = args.results or sorted(Path("bench/results").glob("*.json"))
    rows = load_rows(paths)
    body = markdown(rows)
    print(body)
    if args.plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        for p in plots(rows, args.plots):
            print("wrote", p)
    if args.readme:
        update_readme(args.readme, body)


if __name__ == "__main__":
    main()
