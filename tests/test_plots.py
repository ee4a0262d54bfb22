"""The training curves drawn as PNGs without network, from dvclive folders (persona/plots.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from persona.paths import Paths
from persona.plots import (
    DPI,
    PANEL_INCHES,
    PANELS,
    curves_chart,
    curves_folder,
    main,
    read_curve,
    read_stage_curves,
    render,
)
from tests.conftest import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_tsv(path: Path, name: str, rows: list[tuple[int, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"step\t{name}\n" + "".join(f"{step}\t{value}\n" for step, value in rows))


def write_curves(paths: Paths, stage: str, split_metrics: dict[str, list[str]]) -> None:
    """A dvclive folder as the stage writes it: <split>/<metric>.tsv, a few steps each."""
    for split, metrics in split_metrics.items():
        for metric in metrics:
            write_tsv(curves_folder(paths, stage) / split / f"{metric}.tsv", metric,
                      [(step, 1.0 / step) for step in (1, 2, 3)])


def panels_in(path: Path) -> int:
    """The panel count of a figure, from its width: every panel is PANEL_INCHES wide."""
    import matplotlib.image
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height == PANEL_INCHES[1] * DPI
    return round(width / (PANEL_INCHES[0] * DPI))


def test_each_stage_figure_is_a_png_with_a_panel_per_logged_metric(tmp_path):
    paths = Paths.under(tmp_path)
    write_curves(paths, "sft", {"train": ["loss", "learning_rate"], "eval": ["loss"]})
    write_curves(paths, "reward", {"train": ["accuracy", "grad_norm"], "eval": ["accuracy", "margin"]})
    write_curves(paths, "align", {"ppo": ["reward", "kl", "entropy"]})

    written = render(paths)

    assert written == [curves_chart(paths, stage) for stage in ("sft", "reward", "align")]
    for path in written:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 10_000
    # learning_rate and grad_norm are not panels, and a panel whose metric was not logged is left out.
    assert [panels_in(path) for path in written] == [1, 2, 3]


def test_an_mdpo_align_stage_draws_its_preference_curves(tmp_path):
    """mDPO samples nothing, so it logs none of PPO's panels: its figure shows the loss, margin and accuracy
    that it logs (the names of results/cpu-spc-mdpo's run). Failed first: the plots stage stopped on a missing
    metrics/curves_align.png."""
    paths = Paths.under(tmp_path)
    write_curves(paths, "align", {"train": ["loss", "margin", "accuracy", "grad_norm"],
                                  "eval": ["loss", "margin", "accuracy"]})

    assert render(paths) == [curves_chart(paths, "align")]
    assert panels_in(curves_chart(paths, "align")) == 3


def test_the_command_line_skips_a_stage_without_curves_with_a_warning(tmp_path, capsys):
    paths = Paths.under(tmp_path)
    write_curves(paths, "sft", {"train": ["loss"]})
    write_curves(paths, "reward", {"train": ["grad_norm"]})  # ran, but logged none of its panels
    pictures = tmp_path / "pictures"  # align never ran

    written = main(["--curves", str(paths.curves), "--out", str(pictures)])

    assert written == [pictures / "curves_sft.png"] and sorted(pictures.iterdir()) == written
    warnings = [line for line in capsys.readouterr().err.splitlines() if " WARNING " in line]
    assert len(warnings) == 2
    assert "curves_reward.png not drawn" in warnings[0] and "no curves for align" in warnings[1]


def test_a_curve_is_read_by_column_name(tmp_path):
    """dvclive 3 writes `step` and the metric; dvclive 2 also wrote a `timestamp` column first."""
    path = tmp_path / "loss.tsv"
    path.write_text("timestamp\tstep\tloss\n1700000000\t5\t3.25\n1700000010\t10\t2.5\n")
    assert read_curve(path) == ([5, 10], [3.25, 2.5])


@pytest.mark.parametrize("stage", PANELS)
def test_every_panel_is_a_metric_the_committed_curves_hold(stage):
    """A renamed metric would silently drop its panel: the committed dvclive folders must hold every one."""
    logged = read_stage_curves(curves_folder(Paths(curves=REPO / "dvclive"), stage))
    assert set(PANELS[stage]) <= set(logged)
