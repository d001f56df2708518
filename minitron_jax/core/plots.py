"""Line plots shared by the run report's training curves and the sweeps' results page: matplotlib
without a display, lines with dashed reference levels, and PNGs written atomically."""

from __future__ import annotations

import io
import pathlib
from typing import Any, Mapping, Sequence

from minitron_jax.core import atomic


def pyplot():
  """matplotlib.pyplot on the Agg backend: runs are headless, and a display backend chosen by
  the environment would fail there."""
  import matplotlib  # noqa: PLC0415  (only the pages with plots need it)

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def ticker():
  import matplotlib.ticker  # noqa: PLC0415

  return matplotlib.ticker


def draw_lines(axes, series: Mapping[str, tuple[Sequence, Sequence]], *,
               hlines: Mapping[str, float] | None = None, markers: bool = True,
               styles: Mapping[str, Mapping[str, Any]] | None = None) -> None:
  """One line per series (styles[label]: extra plot arguments of one); a dashed gray horizontal
  reference per hlines entry (e.g. the teacher's loss), labelled on the line itself so the
  legend keeps to the series."""
  for label, (x, y) in series.items():
    style = {"marker": "o" if markers else None, "markersize": 3, "label": label,
             **(styles or {}).get(label, {})}
    axes.plot(x, y, **style)
  for index, (label, value) in enumerate((hlines or {}).items()):
    axes.axhline(value, linestyle="--", color="gray", linewidth=1, gid=label)
    # Labels alternate between the left and right edges, so two close levels (a teacher and a
    # pruned model barely apart) stay legible; x in axes units, whatever range is set later.
    right = index % 2
    axes.annotate(label, (right, value), xycoords=axes.get_yaxis_transform(), fontsize=8,
                  color="gray", xytext=(-4 if right else 4, 3), textcoords="offset points",
                  ha="right" if right else "left")
  if series and all(isinstance(v, int) for x, _ in series.values() for v in x):
    axes.xaxis.set_major_locator(ticker().MaxNLocator(integer=True))


def save(figure, path: pathlib.Path) -> str:
  """Writes the figure as a PNG atomically (a reader never sees half an image), closes it and
  returns the file's name."""
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  pyplot().close(figure)
  atomic.write_bytes(path, buffer.getvalue())
  return pathlib.Path(path).name
