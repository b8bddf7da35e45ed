"""What every study shares: its output directory, progress, and figures.

One results writer (:class:`StudyOutput`) owns a study's ``output_dir``:
``results.json`` (flat keys like ``test/adv_robustness/pgd/expected``),
tables as CSV and Markdown, ``figures/*.png``, TensorBoard scalars under
``tensorboard/``.  Every file is written atomically, and ``results.json`` is
rewritten after each finished stage, so an interrupted study keeps what it
computed.
"""

from __future__ import annotations

import csv
import io
import os
import time
from typing import Any, Iterable, Mapping, Sequence

from absl import logging

from tfp_bnn_adv import files

__all__ = ["StudyOutput", "Progress", "format_table", "markdown_table"]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats with three decimals."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def format_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A fixed-width plain-text table for the terminal."""
    rows = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return "\n".join(out) + "\n"


class StudyOutput:
    """A study's output directory: results, tables, figures, TensorBoard.

    Args:
      output_dir: created if missing.
      name: the study's name, used in log lines.

    Example:
      >>> out = StudyOutput("/tmp/run", "attack_table")
      >>> out.update({"test/accuracy": 0.91})   # rewrites results.json
      >>> out.table("table", ["method", "FGSM"], [["HMC", 0.84]])
      >>> fig_path = out.figure_path("robustness_vs_width")
    """

    def __init__(self, output_dir: str, name: str):
        if not isinstance(output_dir, (str, os.PathLike)) or not str(output_dir):
            raise ValueError(f"output_dir must be a directory path, got "
                             f"{output_dir!r}.")
        self.dir = os.fspath(output_dir)
        self.name = name
        os.makedirs(os.path.join(self.dir, "figures"), exist_ok=True)
        self.results: dict[str, Any] = {}
        path = self.path("results.json")
        if os.path.exists(path):
            try:
                self.results = dict(files.read_json(path))
            except ValueError:
                logging.warning("%s: ignoring unreadable %s", name, path)
        self._writer = None

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def update(self, values: Mapping[str, Any]) -> None:
        """Merges ``values`` into ``results.json`` (atomically) and TensorBoard."""
        self.results.update(values)
        files.write_json(self.path("results.json"), self.results)
        self.scalars(values)

    def scalars(self, values: Mapping[str, Any], step: int = 0) -> None:
        """Writes the numeric entries of ``values`` as TensorBoard scalars."""
        import tensorflow as tf  # pylint: disable=g-import-not-at-top
        numeric = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not numeric:
            return
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.path("tensorboard"))
        with self._writer.as_default():
            for k, v in numeric.items():
                tf.summary.scalar(k, v, step=step)
        self._writer.flush()

    def table(self, stem: str, header: Sequence[str],
              rows: Sequence[Sequence[Any]], note: str = "") -> str:
        """Writes ``<stem>.csv`` and ``<stem>.md``; returns the Markdown."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        writer.writerows(rows)
        files.write_text(self.path(f"{stem}.csv"), buf.getvalue())
        md = markdown_table(header, rows) + (f"\n{note}\n" if note else "")
        files.write_text(self.path(f"{stem}.md"), md)
        return md

    def figure_path(self, stem: str) -> str:
        return self.path("figures", f"{stem}.png")

    def save_figure(self, fig, stem: str) -> str:
        """Saves a matplotlib figure atomically as ``figures/<stem>.png``."""
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
        path = self.figure_path(stem)
        files.write_bytes(path, buf.getvalue())
        import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
        plt.close(fig)
        return path


class Progress:
    """Stage-by-stage progress with an ETA, logged with absl.

    Example:
      >>> p = Progress("sweep", total=12)
      >>> for cfg in configs:
      ...     run(cfg)
      ...     p.step(f"width={cfg.width}")
    """

    def __init__(self, name: str, total: int):
        self.name = name
        self.total = max(1, int(total))
        self.done = 0
        self.start = time.perf_counter()

    def step(self, what: str = "", count: int = 1) -> None:
        self.done += count
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        logging.info("[%s] %d/%d %s | elapsed %s, ETA %s", self.name,
                     self.done, self.total, what, _hms(elapsed), _hms(eta))


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    return plt
