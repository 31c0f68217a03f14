"""accuracy.png marks chance: results.json's `chance` worked out by hand, and the chart read back pixel by pixel: a
dashed line at the chance accuracy (placed against the chart's own 0% and 100% grid lines) with a label above the
plot, drawn by write_report from results.json, and absent when there is no chance level."""

import numpy as np
from PIL import Image

from llavaction_jax.eval import metrics, report

GRID = (220, 220, 220)


def pred(index, n_options, gt_letter, answer):
    options = [f"{chr(65 + i)}. option {i}" for i in range(n_options)]
    gt_text = options[0].split(". ", 1)[1]
    return {"index": index, "uid": f"q{index}", "options": options, "gt_letter": gt_letter, "gt_text": gt_text,
            "groups": {"verb": str(index % 2)},
            "generate": {"raw": answer, "parsed": answer.split(". ", 1)[-1], "letter": answer[0],
                         "correct_text": answer == options[0] and gt_letter is not None,
                         "correct_letter": answer[0] == gt_letter}}


def test_chance_is_the_mean_of_one_over_the_options_with_no_chance_when_the_gt_is_missing():
    preds = [pred(0, 5, "A", "A. option 0"), pred(1, 5, "A", "B. option 1"), pred(2, 4, "A", "A. option 0"),
             pred(3, 3, None, "C. option 2")]  # the last: recognition protocol, GT not among the options
    assert metrics.compute_metrics(preds)["chance"] == (1 / 5 + 1 / 5 + 1 / 4 + 0) / 4
    assert metrics.compute_metrics(preds[:2])["chance"] == 1 / 5


def read_chart(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def chance_line(pixels):
    """The columns and rows holding the chance colour exactly."""
    ys, xs = np.nonzero((pixels == report.CHANCE_COLOUR).all(-1))
    return xs, ys


def red_tinted(pixels):
    """The chance colour, also where antialiased text blends it with the white background."""
    return (pixels[..., 0] - pixels[..., 1] > 60) & (pixels[..., 0] - pixels[..., 2] > 60)


def grid_columns(pixels):
    """x of the 0%, 20%, ..., 100% grid lines: columns whose light-grey pixels run over many rows."""
    counts = (pixels == GRID).all(-1).sum(0)
    return sorted(int(x) for x in np.nonzero(counts >= 8)[0])


def test_the_chart_draws_a_dashed_labelled_line_at_chance(tmp_path):
    bars = [("generate, text (upstream)", 0.8, 50), ("score, sum log-prob", 0.1, 50), ("verb take (generate)", 0.5, 9)]
    report.draw_chart(bars, tmp_path / "with.png", "t", chance=0.25)
    report.draw_chart(bars, tmp_path / "without.png", "t")
    without = read_chart(tmp_path / "without.png")  # no chance level: no line and no label (checked below)

    pixels = read_chart(tmp_path / "with.png")
    grid = grid_columns(pixels)
    assert len(grid) == 6, grid  # 0%, 20%, ..., 100%
    zero, hundred = grid[0], grid[-1]
    grid_rows = np.nonzero((pixels[:, hundred] == GRID).all(-1))[0]  # the 100% line is never under a bar
    plot_top, plot_bottom = grid_rows.min(), grid_rows.max()

    xs, ys = chance_line(pixels)
    in_plot = (ys >= plot_top) & (ys <= plot_bottom)
    line_x = np.unique(xs[in_plot])
    assert abs(line_x.mean() - (zero + 0.25 * (hundred - zero))) <= 1.5 and np.ptp(line_x) <= 2, line_x
    # dashed over the whole plot, across the bars: runs of coloured rows with gaps between them
    rows = np.zeros(plot_bottom - plot_top + 1, bool)
    rows[ys[in_plot] - plot_top] = True
    starts = np.flatnonzero(rows[1:] & ~rows[:-1]) + 1
    assert len(starts) >= 6 and 0.3 < rows.mean() < 0.9, (len(starts), rows.mean())
    assert rows[: len(rows) // 4].any() and rows[-len(rows) // 4:].any()
    # drawn over the bars: dashes in rows of the first bar (80%, which spans 25%), whose colour is blue elsewhere
    first_bar = np.nonzero((pixels[:, zero + 5] == (52, 101, 164)).all(-1))[0]
    first_bar = first_bar[first_bar < first_bar.min() + 26]
    assert len(first_bar) >= 10 and set(ys[in_plot]) & set(first_bar.tolist())
    # the label: text in the chance colour (antialiased: red-tinted pixels) above the plot, right of the line
    label_ys, label_xs = np.nonzero(red_tinted(pixels)[:plot_top])
    assert len(label_xs) >= 20 and label_xs.min() >= line_x.min() and label_xs.max() < line_x.max() + 120
    assert not red_tinted(without).any()


def test_write_report_draws_results_chance_and_names_it(tmp_path):
    preds = [pred(i, 5, "A", "A. option 0" if i % 2 else "B. option 1") for i in range(6)]
    results = {"questions": "q.jsonl", "format": "ek100", "model": {"name": "m"},
               "run": {"process_count": 1, "mesh": {}, "questions_per_second": 1.0, "wall_s": 1.0},
               **metrics.compute_metrics(preds)}
    text = report.write_report(results, tmp_path).read_text()
    assert "- chance: 20.00%" in text
    pixels = read_chart(tmp_path / report.CHART_NAME)
    grid = grid_columns(pixels)
    xs, _ = chance_line(pixels)
    assert len(xs) and abs(np.median(xs) - (grid[0] + 0.2 * (grid[-1] - grid[0]))) <= 1.5
