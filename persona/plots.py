"""The training curves as PNGs that read offline: dvclive/<stage> -> metrics/curves_<stage>.png.

`dvc plots show` draws the same curves in an HTML page that loads vega from a CDN, so offline the page is
blank. These figures are drawn by matplotlib's Agg backend and need no network. One figure per training
stage, one panel per metric, train and eval curves overlaid: the stages log different metrics over
different step counts, and a stage that has not run yet is a missing file rather than an empty row.
The evaluation's bar chart is metrics/eval.png, drawn by persona/evaluate.py.

The DVC stage `plots` redraws them whenever a training stage's curves change; `python -m persona.plots`
redraws from whatever curves are there.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
from pathlib import Path

from persona.paths import DEFAULT, TRAINING_STAGES, Paths
from persona.runner import start_logging

log = logging.getLogger(__name__)

# The curves that say whether a stage worked. dvclive logs more (learning rate, grad norm, PPO clip
# fractions, ...): `dvc plots show` has them all. PPO's response length is here because a policy can buy
# reward with longer replies that recite the persona.
PANELS = {"sft": ("loss", "mean_token_accuracy", "entropy"),
          "reward": ("accuracy", "loss", "margin"),
          "align": ("reward", "kl", "entropy", "response_length")}
# A stage that logged none of its PANELS draws these instead: mDPO (align.algorithm: mdpo) samples nothing, so it
# has no reward, KL or reply length, only its preference loss, margin and accuracy.
FALLBACK_PANELS = {"align": ("loss", "margin", "accuracy")}
PANEL_INCHES = (3.6, 2.8)
DPI = 100

Curve = tuple[list[int], list[float]]  # (steps, values)


def curves_chart(paths: Paths, stage: str) -> Path:
    return paths.metrics / f"curves_{stage}.png"


def curves_folder(paths: Paths, stage: str) -> Path:
    """Where dvclive writes a stage's TSVs: <split>/<metric>.tsv, e.g. train/loss.tsv, eval/loss.tsv."""
    return paths.curves_dir(stage) / "plots" / "metrics"


def read_curve(path: Path) -> Curve:
    """One dvclive TSV: a `step` column and one named after the metric (dvclive 2 also wrote `timestamp`)."""
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return [int(row["step"]) for row in rows], [float(row[path.stem]) for row in rows]


def read_stage_curves(folder: Path) -> dict[str, dict[str, Curve]]:
    """metric -> split -> curve, for every TSV under `folder`."""
    curves: dict[str, dict[str, Curve]] = {}
    for path in sorted(folder.rglob("*.tsv")):
        split = path.parent.relative_to(folder).as_posix()
        curves.setdefault(path.stem, {})[split] = read_curve(path)
    return curves


def draw_stage(stage: str, curves: dict[str, dict[str, Curve]], path: Path) -> list[str]:
    """Write `stage`'s figure to `path`, one panel per metric of PANELS[stage] (or, none logged,
    FALLBACK_PANELS[stage]) that was logged; the panels drawn (none: nothing written)."""
    panels = ([metric for metric in PANELS[stage] if metric in curves]
              or [metric for metric in FALLBACK_PANELS.get(stage, ()) if metric in curves])
    if not panels:
        return []
    # A bare Figure on the Agg canvas: PNG drawn in memory, no display or pyplot state (or its import time).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(PANEL_INCHES[0] * len(panels), PANEL_INCHES[1]))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(panels), squeeze=False)
    for axis, metric in zip(axes[0], panels):
        # train first, so it keeps matplotlib's first colour in every panel and figure
        for split, (steps, values) in sorted(curves[metric].items(), key=lambda item: (item[0] != "train", item[0])):
            axis.plot(steps, values, marker="o", markersize=3, label=split)
        axis.set_title(metric, fontsize=10)
        axis.set_xlabel("step", fontsize=8)
        axis.tick_params(labelsize=8)
        axis.grid(alpha=0.3)
        if len(curves[metric]) > 1:
            axis.legend(fontsize=8)
    figure.suptitle(f"{stage} training curves", fontsize=11)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, metadata={"Software": None})  # no matplotlib version stamp: same bytes on every clone
    return panels


def render(paths: Paths = DEFAULT) -> list[Path]:
    """Each training stage's figure from its dvclive curves; a stage without curves (not run yet) is
    skipped with a warning."""
    written = []
    for stage in TRAINING_STAGES:
        folder = curves_folder(paths, stage)
        if not folder.is_dir():
            log.warning("no curves for %s in %s: not drawn", stage, folder)
            continue
        path = curves_chart(paths, stage)
        panels = draw_stage(stage, read_stage_curves(folder), path)
        if panels:
            log.info("wrote %s (%s)", path, ", ".join(panels))
            written.append(path)
        else:
            log.warning("none of %s in %s: %s not drawn", ", ".join(PANELS[stage]), folder, path)
    return written


def main(argv: list[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(prog="python -m persona.plots", description=__doc__.splitlines()[0])
    parser.add_argument("--curves", type=Path, default=DEFAULT.curves, help="dvclive folder (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT.metrics, help="PNG folder (default: %(default)s)")
    args = parser.parse_args(argv)
    start_logging()
    return render(dataclasses.replace(DEFAULT, curves=args.curves, metrics=args.out))


if __name__ == "__main__":
    main()
