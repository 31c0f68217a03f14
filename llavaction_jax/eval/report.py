"""The human-readable side of an evaluation: report.md and a bar chart drawn with Pillow (matplotlib is not a
dependency). Everything here reads results.json's dict only."""

from __future__ import annotations

import pathlib

from PIL import Image, ImageDraw, ImageFont

CHART_NAME = "accuracy.png"
_MODE_BARS = (("generate", "accuracy_text", "generate, text (upstream)"),
              ("generate", "accuracy_letter", "generate, letter"),
              ("score", "accuracy_letter", "score, sum log-prob"),
              ("score", "accuracy_letter_normalized", "score, mean log-prob"))


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def chart_bars(results: dict, top_groups: int = 10) -> list[tuple[str, float, int]]:
    """(label, accuracy, n) bars: one per mode metric, then the most frequent verbs (or categories) under the
    first mode's headline metric."""
    bars = []
    for mode, key, label in _MODE_BARS:
        stats = results["modes"].get(mode)
        if stats and stats.get(key) is not None:
            bars.append((label, stats[key], stats["n"]))
    first_mode = next(iter(results["modes"]), None)
    group = next((g for g in ("verb", "category", "noun") if g in results["breakdowns"]), None)
    if first_mode and group:
        for row in results["breakdowns"][group][first_mode][:top_groups]:
            bars.append((f"{group} {row['name']} ({first_mode})", row["accuracy"], row["n"]))
    return bars


CHANCE_COLOUR = (200, 30, 30)  # the chance line and its label; no bar, grid line or text uses it


def draw_chart(bars: list[tuple[str, float, int]], path: str | pathlib.Path, title: str,
               chance: float | None = None) -> None:
    """A horizontal bar chart of accuracies in [0, 1], with a 0-100% axis. ``chance`` (the accuracy of a uniform
    random pick, results.json's ``chance``) is drawn across the bars as a dashed line at that accuracy, labelled
    above the plot."""
    font = ImageFont.load_default()
    row, left, right, top = 26, 270, 90, 44
    width, plot = 900, 900 - 270 - 90
    image = Image.new("RGB", (width, top + row * max(len(bars), 1) + 36), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 12), title, fill="black", font=font)
    bottom = top + row * len(bars)
    for tick in range(0, 101, 20):
        x = left + plot * tick / 100
        draw.line([(x, top - 4), (x, bottom)], fill=(220, 220, 220))
        draw.text((x - 10, bottom + 6), f"{tick}%", fill="gray", font=font)
    for i, (label, accuracy, n) in enumerate(bars):
        y = top + i * row
        colour = (52, 101, 164) if not label.startswith(("verb", "noun", "category")) else (115, 160, 90)
        draw.rectangle([left, y + 4, left + max(plot * accuracy, 1), y + row - 4], fill=colour)
        draw.text((10, y + 7), label[:40], fill="black", font=font)
        draw.text((left + plot * accuracy + 6, y + 7), f"{100 * accuracy:.1f}% (n={n})", fill="black", font=font)
    if chance is not None:  # drawn last, over the bars
        x = round(left + plot * chance)
        for y in range(top - 4, bottom, 10):  # 6 px dashes, 4 px gaps
            draw.line([(x, y), (x, min(y + 5, bottom))], fill=CHANCE_COLOUR, width=2)
        draw.text((min(x + 4, width - 90), top - 16), f"chance {100 * chance:.1f}%", fill=CHANCE_COLOUR, font=font)
    image.save(path, format="PNG")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cell = lambda c: str(c).replace("|", "\\|").replace("\n", " ")  # answer texts may hold either
    return lines + ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]


def ek100_section(ek100: dict) -> list[str]:
    """The paper's recognition metrics: action / verb / noun top-1 of the chosen option per mode, the action
    model's own top-1 beside them, and the candidates' recall (the ceiling when the GT is not inserted)."""
    rows = [[f"{mode} (chosen option)", ek100[mode]["n"], *(_pct(ek100[mode][k]) for k in
                                                            ("action_top1", "verb_top1", "noun_top1"))]
            for mode in ("generate", "score") if mode in ek100]
    if "action_model" in ek100:
        model = ek100["action_model"]
        rows.append(["action model's top-1", model["n"], _pct(model["action_top1"]), _pct(model["verb_top1"]),
                     _pct(model["noun_top1"])])
    return (["", "## EK100 action recognition", "",
             f"Candidates' recall (the GT among the options): {_pct(ek100['candidates_recall'])} of {ek100['n']}", ""]
            + _table(["", "n", "action top-1", "verb top-1", "noun top-1"], rows))


def write_report(results: dict, out_dir: str | pathlib.Path, top: int = 15) -> pathlib.Path:
    """Write report.md and the chart into ``out_dir``; returns the report path."""
    out_dir = pathlib.Path(out_dir)
    draw_chart(chart_bars(results), out_dir / CHART_NAME,
               f"{results['format']} accuracy: {results['num_questions']} questions, {results['model']['name']}",
               chance=results.get("chance"))
    lines = [f"# Evaluation: {results['questions']}", "",
             f"- model: {results['model']['name']}", f"- questions: {results['num_questions']} ({results['format']}"
             f"; {results['num_without_gt']} without the right answer among the options)",
             f"- answer modes: {', '.join(results['modes'])}; processes: {results['run']['process_count']}; "
             f"mesh: {results['run']['mesh']}",
             *([f"- chance: {_pct(results['chance'])} (a uniform random pick among each question's options; the "
                 "dashed line of the chart)"] if results.get("chance") is not None else []),
             f"- speed: {results['run']['questions_per_second']:.2f} questions/s after compilation "
             f"({results['run']['wall_s']:.1f} s in all)", "", f"![accuracy]({CHART_NAME})", "", "## Accuracy", ""]
    rows = []
    for mode, stats in results["modes"].items():
        if mode == "generate":
            rows.append(["generate (greedy)", stats["n"], _pct(stats["accuracy_text"]), _pct(stats["accuracy_letter"]),
                         f"{stats['no_letter']} answers name no option"])
        else:
            rows.append(["score (sum log-prob)", stats["n"], _pct(stats["accuracy_text"]),
                         _pct(stats["accuracy_letter"]), f"mean log-prob: {_pct(stats['accuracy_letter_normalized'])}"])
    lines += _table(["mode", "n", "by text (upstream metric)", "by letter", "note"], rows)
    if "action_model_top1_accuracy" in results:
        lines += ["", f"Action model's own top-1 (upstream's 'Avion accuracy'): "
                      f"{_pct(results['action_model_top1_accuracy'])}"]
    if "ek100" in results:
        lines += ek100_section(results["ek100"])
    for group, per_mode in results["breakdowns"].items():
        lines += ["", f"## Accuracy per {group} (most frequent {top})", ""]
        modes = list(per_mode)
        by_key = {m: {r["key"]: r for r in per_mode[m]} for m in modes}
        first = per_mode[modes[0]][:top]
        lines += _table([group, "n"] + modes,
                        [[r["name"], r["n"]] + [_pct(by_key[m][r["key"]]["accuracy"]) for m in modes] for r in first])
    for mode, levels in results["confusions"].items():
        for level, pairs in levels.items():
            if pairs:
                lines += ["", f"## Top confusions, {mode}, {level}", ""]
                lines += _table(["ground truth", "predicted", "count"], [[p["gt"], p["predicted"], p["count"]]
                                                                         for p in pairs])
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
