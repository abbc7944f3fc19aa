"""Markdown tables (for the README) from the JSON the benchmarks write.

    python benchmarks/report.py benchmarks/results/inference_S.json benchmarks/results/training_S.json
"""

from __future__ import annotations

import json
import sys


def _speed(entry: dict) -> str:
    if "tok_s" in entry:
        return f"{entry['tok_s']:.1f}"
    if "tok_s_below" in entry:
        return f"< {entry['tok_s_below']:.1f} (too slow)"
    return entry.get("status", "-")


def inference_table(report: dict) -> str:
    lines = [
        "| dtype | mode | decode tok/s | % of read / copy bandwidth | prefill tok/s | extra RSS while running (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, results in report["results"].items():
        for mode, entry in results.items():
            decode, prefill = entry["decode"], entry["prefill"]
            extra = max(decode["extra_rss_gib"], prefill.get("extra_rss_gib", 0.0))
            name = f"**{mode}**" if mode == "mobilemoe" else mode
            lines.append(
                f"| {dtype} | {name} | {decode['tok_s']:.2f} | {decode['fraction_of_read_bandwidth']:.0%} / "
                f"{decode['fraction_of_copy_bandwidth']:.0%} | "
                f"{_speed(prefill)} | {extra:.2f} |"
            )
    lines.append("")
    for dtype, phases in report["ratios"].items():
        for phase, ratios in phases.items():
            text = ", ".join(f"{name.replace('_', ' ')} **{value:.2f}x**" for name, value in ratios.items())
            lines.append(f"- {dtype} {phase}: {text}")
    return "\n".join(lines)


def training_table(report: dict) -> str:
    lines = ["| dtype | mode | train tok/s | peak RSS (GiB) |", "|---|---|---|---|"]
    for dtype, results in report["results"].items():
        for mode, entry in results.items():
            name = f"**{mode}**" if mode == "mobilemoe" else mode
            lines.append(f"| {dtype} | {name} | {_speed(entry)} | {entry['peak_rss_gib']:.2f} |")
    lines.append("")
    for dtype, ratios in report["ratios"].items():
        lines.append(f"- {dtype}: " + ", ".join(f"{name.replace('_', ' ')} **{value:.2f}x**" for name, value in ratios.items()))
    return "\n".join(lines)


def main(paths: list[str]) -> int:
    for path in paths:
        with open(path) as handle:
            report = json.load(handle)
        machine = report["machine"]
        print(f"<!-- {path}: {machine['cpu']} ({machine['cpu_capability']}), {machine['threads']} threads, torch {machine['torch']} -->")
        print(inference_table(report) if report["benchmark"] == "inference" else training_table(report))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
