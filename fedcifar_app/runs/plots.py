"""The run folder's pictures: learning curves and a grid of sample images. Flower-free.

Figures are built with matplotlib's object API on the Agg canvas, never ``pyplot``: no
global figure state and no GUI backend, so plotting is safe from the ServerApp's thread
and on machines without a display. Each PNG is rendered in memory and written
atomically, so a reader (or a person refreshing the image during a run) never sees half
a file.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..data import ImageTensors
from ..files import atomic_write_bytes
from .metrics import CENTRAL_ACCURACY, CENTRAL_LOSS, EVAL_ACCURACY, EVAL_LOSS, TRAIN_LOSS, RoundRow

CURVES = "curves.png"
SAMPLES = "samples.png"
SAMPLE_ROWS, SAMPLE_COLS = 4, 8

# (metrics key, legend label, line style) per panel
ACCURACY_LINES = (
    (CENTRAL_ACCURACY, "global model on the test set (server)", "-"),
    (EVAL_ACCURACY, "federated evaluation (clients' validation sets)", "--"),
)
LOSS_LINES = (
    (CENTRAL_LOSS, "global model on the test set (server)", "-"),
    (EVAL_LOSS, "federated evaluation (clients' validation sets)", "--"),
    (TRAIN_LOSS, "local training (clients' mean)", ":"),
)


def _render(figure: Figure, path: Path, dpi: int) -> None:
    buffer = io.BytesIO()
    FigureCanvasAgg(figure)
    figure.savefig(buffer, format="png", dpi=dpi)
    atomic_write_bytes(Path(path), buffer.getvalue())


def _series(rows: Sequence[RoundRow], key: str) -> tuple[list[int], list[float]]:
    """The rounds that have a finite value for ``key`` (eval/train values are None in round 0)."""
    rounds, values = [], []
    for row in rows:
        value = row.get(key)
        if value is not None and math.isfinite(value):
            rounds.append(row.round)
            values.append(value)
    return rounds, values


def write_curves(path: Path, rows: Sequence[RoundRow]) -> None:
    """curves.png: accuracy (left) and loss (right) per round, from metrics.json's rows."""
    last = max((row.round for row in rows), default=0)
    figure = Figure(figsize=(11, 5), layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    for axes, lines in ((accuracy_axes, ACCURACY_LINES), (loss_axes, LOSS_LINES)):
        for key, label, style in lines:
            rounds, values = _series(rows, key)
            if rounds:
                axes.plot(rounds, values, style, marker="o", markersize=4, label=label)
        axes.set_xlabel("round (0 = initial model)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlim(-0.25, max(last, 1) + 0.25)
        axes.grid(True, alpha=0.3)
        if axes.lines:  # below the panel, where it never hides a curve
            axes.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        else:
            axes.text(0.5, 0.5, "no rounds recorded yet", ha="center", va="center", transform=axes.transAxes)

    accuracy_axes.set_ylim(0.0, 1.02)
    accuracy_axes.set_ylabel("accuracy")
    rounds, values = _series(rows, CENTRAL_ACCURACY)
    title = "Accuracy"
    if values:
        best = int(np.argmax(values))
        title = f"Accuracy: test {values[-1]:.4f} after round {rounds[-1]}"
        if best != len(values) - 1:
            title += f" (best {values[best]:.4f}, round {rounds[best]})"
    accuracy_axes.set_title(title)
    loss_axes.set_ylabel("cross-entropy loss")
    loss_axes.set_title("Loss")
    figure.suptitle(
        f"Federated training after {last} round{'s' if last != 1 else ''}"
        if last
        else "Federated training: initial model"
    )
    _render(figure, path, dpi=100)


def write_samples(path: Path, data: ImageTensors, class_names: Sequence[str], *, where: str = "partition 0") -> None:
    """samples.png: the first 32 training images of a partition with their class names (4 x 8 grid).

    ``where`` names the data in the title, e.g. "partition 0 of 10". The grid is one image
    with a text label over each tile: 32 separate axes would cost seconds to lay out.
    """
    count = min(len(data), SAMPLE_ROWS * SAMPLE_COLS)
    size = data.images.shape[-1] if count else 32
    gap, label_space = size // 8, size // 2  # pixels between tiles and above each tile for its name
    cell_w, cell_h = size + gap, size + label_space
    mosaic = np.full((SAMPLE_ROWS * cell_h, SAMPLE_COLS * cell_w - gap, 3), 255, dtype=np.uint8)
    width, title_height = 10.0, 0.4  # inches; the mosaic's own aspect gives the height
    image_height = width * mosaic.shape[0] / mosaic.shape[1]
    figure = Figure(figsize=(width, image_height + title_height))
    axes = figure.add_axes((0.0, 0.0, 1.0, image_height / (image_height + title_height)))
    for index in range(count):
        row, col = divmod(index, SAMPLE_COLS)
        top, left = row * cell_h + label_space, col * cell_w
        mosaic[top : top + size, left : left + size] = data.images[index].permute(1, 2, 0).cpu().numpy()
        label = int(data.labels[index])
        name = class_names[label] if 0 <= label < len(class_names) else str(label)
        axes.text(left + size / 2, top - 1.5, name, ha="center", va="bottom", fontsize=10)
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_axis_off()
    figure.suptitle(f"The first {count} training images of {where}", y=0.995, va="top")
    _render(figure, path, dpi=100)


def write_comparison(path: Path, runs: Sequence[tuple[str, int, Sequence[RoundRow]]]) -> None:
    """comparison.png: central accuracy (left) and central loss (right) of several runs.

    ``runs``: (label, colour group, rows). Runs of one group (the same config, other seeds) share
    a colour, and the legend under both panels names each group once.
    """
    groups = len({group for _, group, _ in runs})
    figure = Figure(figsize=(12, 5.0 + 0.22 * groups), layout="constrained")
    accuracy_axes, loss_axes = figure.subplots(1, 2)
    labelled: set[int] = set()
    for label, group, rows in runs:
        colour = f"C{group % 10}"
        rounds, values = _series(rows, CENTRAL_ACCURACY)
        accuracy_axes.plot(
            rounds, values, "-", color=colour, marker="o", markersize=3, label=None if group in labelled else label
        )
        rounds, values = _series(rows, CENTRAL_LOSS)
        loss_axes.plot(rounds, values, "-", color=colour, marker="o", markersize=3)
        labelled.add(group)
    for axes, title in ((accuracy_axes, "Central accuracy (test set)"), (loss_axes, "Central loss (test set)")):
        axes.set_title(title)
        axes.set_xlabel("round (0 = initial model)")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(True, alpha=0.3)
    accuracy_axes.set_ylabel("accuracy")
    loss_axes.set_ylabel("cross-entropy loss")
    if runs:  # under both panels; constrained layout makes room for an "outside" legend
        figure.legend(loc="outside lower center", fontsize="small", frameon=False)
    _render(figure, path, dpi=100)
