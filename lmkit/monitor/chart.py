"""The dashboard's loss chart: a bounded, bucketed series and a braille line chart.

:class:`BucketSeries` keeps any number of (step, value) points in a fixed number of buckets;
:class:`LossChart` draws the train series (mean line + per-bucket minima) and the val series
(one ``◆`` per evaluation, joined by a line) with braille dots (Unicode block U+2800), with
y-axis labels whose precision follows the range shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from rich.console import Console, ConsoleOptions, RenderResult
from rich.style import Style
from rich.text import Text

from lmkit.monitor.console import fmt_count

# --------------------------------------------------------------------------------------
# A bounded, bucketed series
# --------------------------------------------------------------------------------------


class BucketSeries:
    """Values over steps, kept in at most ``capacity`` buckets of equal step width.

    Each bucket holds min, max, sum and count of the values whose step falls in it. When
    a step lands past the last bucket, neighbouring buckets are merged pairwise and the
    width doubles, so memory is O(capacity) and :meth:`add` is O(1) amortised, however
    long the run (100k logged steps fit in 512 buckets of 256 steps).
    Non-finite values are counted in ``non_finite`` and not bucketed.
    """

    def __init__(self, capacity: int = 512):
        if capacity < 2:
            raise ValueError("capacity must be >= 2")
        self.capacity = capacity
        self.width = 1
        self.origin: int | None = None
        self.buckets: list[list[float] | None] = []  # [min, max, sum, count]
        self.count = 0
        self.non_finite = 0
        self.last: tuple[int, float] | None = None
        self.first_step: int | None = None
        self.last_step: int | None = None

    def add(self, step: int, value: float) -> None:
        if not math.isfinite(value):
            self.non_finite += 1
            return
        if self.origin is None:
            self.origin = step
        index = max(0, step - self.origin) // self.width
        while index >= self.capacity:
            self._merge()
            index = max(0, step - self.origin) // self.width
        if index >= len(self.buckets):
            self.buckets.extend([None] * (index + 1 - len(self.buckets)))
        bucket = self.buckets[index]
        if bucket is None:
            self.buckets[index] = [value, value, value, 1.0]
        else:
            bucket[0] = min(bucket[0], value)
            bucket[1] = max(bucket[1], value)
            bucket[2] += value
            bucket[3] += 1
        self.count += 1
        self.last = (step, value)
        self.first_step = step if self.first_step is None else min(self.first_step, step)
        self.last_step = step if self.last_step is None else max(self.last_step, step)

    def _merge(self) -> None:
        merged: list[list[float] | None] = []
        for i in range(0, len(self.buckets), 2):
            pair = [b for b in self.buckets[i:i + 2] if b is not None]
            if not pair:
                merged.append(None)
            else:
                merged.append([min(b[0] for b in pair), max(b[1] for b in pair), sum(b[2] for b in pair),
                               sum(b[3] for b in pair)])
        self.buckets = merged
        self.width *= 2

    def points(self) -> list[tuple[float, float, float, float]]:
        """``(step, min, mean, max)`` per non-empty bucket, the step being the bucket's centre
        (clipped to the steps actually seen)."""
        out = []
        if self.origin is None:
            return out
        for i, b in enumerate(self.buckets):
            if b is None:
                continue
            lo = self.origin + i * self.width
            centre = min(max(lo + (self.width - 1) / 2, self.first_step or lo), self.last_step or lo)
            out.append((float(centre), b[0], b[2] / b[3], b[1]))
        return out

    def copy(self) -> BucketSeries:
        other = BucketSeries(self.capacity)
        other.width, other.origin, other.count, other.non_finite = self.width, self.origin, self.count, self.non_finite
        other.buckets = [None if b is None else list(b) for b in self.buckets]
        other.last, other.first_step, other.last_step = self.last, self.first_step, self.last_step
        return other


# --------------------------------------------------------------------------------------
# Braille chart
# --------------------------------------------------------------------------------------

# Dot (x, y) of a 2x4 braille cell -> bit (Unicode 3.0, block U+2800).
_BRAILLE_BITS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))


class BrailleCanvas:
    """A ``cols`` x ``rows`` character canvas of 2x4 braille dots per character, with
    layers: each character shows the dots of its highest-priority layer."""

    def __init__(self, cols: int, rows: int):
        self.cols, self.rows = cols, rows
        self.layers: list[tuple[Style, dict[tuple[int, int], int]]] = []
        self.marks: dict[tuple[int, int], tuple[str, Style]] = {}  # whole characters, over every layer

    @property
    def width(self) -> int:
        return 2 * self.cols

    @property
    def height(self) -> int:
        return 4 * self.rows

    def layer(self, style: Style | str) -> dict[tuple[int, int], int]:
        """A new layer on top of the previous ones; returns its cell -> bits map."""
        cells: dict[tuple[int, int], int] = {}
        self.layers.append((Style.parse(style) if isinstance(style, str) else style, cells))
        return cells

    def dot(self, cells: dict[tuple[int, int], int], x: int, y: int) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            key = (y // 4, x // 2)
            cells[key] = cells.get(key, 0) | _BRAILLE_BITS[y % 4][x % 2]

    def mark(self, x: int, y: int, char: str, style: Style | str) -> None:
        """Put the character ``char`` in the cell holding dot (x, y), over every layer."""
        if 0 <= x < self.width and 0 <= y < self.height:
            self.marks[(y // 4, x // 2)] = (char, Style.parse(style) if isinstance(style, str) else style)

    def vline(self, cells: dict[tuple[int, int], int], x: int, y0: int, y1: int) -> None:
        for y in range(min(y0, y1), max(y0, y1) + 1):
            self.dot(cells, x, y)

    def segment(self, cells: dict[tuple[int, int], int], x0: int, y0: int, x1: int, y1: int) -> None:
        """A connected line from (x0, y0) to (x1, y1), ``x0 <= x1``: each column gets the
        vertical run the line crosses in it, so steep falls have no gaps."""
        if x1 <= x0:
            self.vline(cells, x0, y0, y1)
            return
        slope = (y1 - y0) / (x1 - x0)
        for x in range(x0, x1 + 1):
            ya = y0 + slope * (max(x - 0.5, x0) - x0)
            yb = y0 + slope * (min(x + 0.5, x1) - x0)
            self.vline(cells, x, int(round(ya)), int(round(yb)))

    def lines(self) -> list[Text]:
        """One :class:`~rich.text.Text` per row; runs of one style are appended together
        (a row costs O(cols), not one Rich span per character)."""
        grid: list[list[tuple[str, Style | None]]] = [[(" ", None)] * self.cols for _ in range(self.rows)]
        for style, cells in self.layers:  # later layers overwrite earlier ones
            for (row, col), bits in cells.items():
                if bits and 0 <= row < self.rows and 0 <= col < self.cols:
                    grid[row][col] = (chr(0x2800 + bits), style)
        for (row, col), (char, style) in self.marks.items():
            if 0 <= row < self.rows and 0 <= col < self.cols:
                grid[row][col] = (char, style)
        out = []
        for cells in grid:
            text = Text()
            run, run_style = [], None
            for char, style in cells:
                if style is not run_style and run:
                    text.append("".join(run), run_style)
                    run = []
                run.append(char)
                run_style = style
            if run:
                text.append("".join(run), run_style)
            out.append(text)
        return out


def axis_labels(lo: float, hi: float, n: int = 3) -> list[str]:
    """``n`` evenly spaced y-axis labels from ``hi`` down to ``lo``, with as many decimals as
    the spacing needs for neighbouring labels to differ (a range of 0.012 gets 3 decimals:
    ``9.012 / 9.006 / 9.000``, not ``9.01 / 9.01 / 9``); values of 1,000 and more as ``1.2k``."""
    values = [hi - i * (hi - lo) / (n - 1) for i in range(n)]
    if max(abs(lo), abs(hi)) >= 1000:
        return [fmt_count(v) for v in values]
    spacing = (hi - lo) / (n - 1)
    decimals = 0 if spacing <= 0 else min(6, max(0, math.ceil(-math.log10(spacing) + 1e-9)))
    return [f"{v:.{decimals}f}" for v in values]


class LossChart:
    """Train loss (a line through the mean of each bucket, and dots at each bucket's
    minimum) and val loss (a ``◆`` at each evaluation, joined by a line) over steps, drawn with braille dots
    to fit the space Rich gives it (``options.height`` rows, ``options.max_width`` columns).
    Several buckets that fall on one pixel column are merged again (min of mins, mean of
    means), so drawing costs O(buckets + width x height) whatever the run's length.

    Args:
        train / val: the series (copies: the chart is rendered on another thread).
        max_steps: the run's length (for the caption); the x axis spans the steps seen
            so far, from ``start_step``, so an early curve is not squeezed to the left.
    """

    TRAIN = Style(color="cyan", bold=True)
    BAND = Style(color="blue")
    VAL = Style(color="yellow", bold=True)
    VAL_MARK = "◆"  # the legend (:meth:`legend`) shows the same character

    def __init__(self, train: BucketSeries, val: BucketSeries, *, max_steps: int | None = None,
                 start_step: int = 0, cache: dict | None = None):
        self.train, self.val = train, val
        self.max_steps = max_steps
        self.start_step = start_step
        self.cache = cache  # reuse the last drawing while the data and the size are the same

    @classmethod
    def legend(cls) -> Text:
        """The chart's key, drawn with the characters the chart uses."""
        return Text.assemble(("loss  ", "bold"), ("━ train", cls.TRAIN), (" (mean, ", "dim"), ("⠄ min", cls.BAND),
                             (" per bucket)  ", "dim"), (f"─{cls.VAL_MARK} val", cls.VAL))

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        key = (options.max_width, options.height, self.train.count, self.train.last, self.val.count,
               self.val.last, self.train.width, self.start_step)
        if self.cache is not None and self.cache.get("key") == key:
            yield from self.cache["lines"]
            return
        lines = list(self._draw(options))
        if self.cache is not None:
            self.cache.update(key=key, lines=lines)
        yield from lines

    def _draw(self, options: ConsoleOptions) -> Iterable[Text]:
        width = options.max_width
        height = options.height or 10
        train, val = self.train.points(), self.val.points()
        if not train and not val:
            yield Text("waiting for the first logged step…", style="dim")
            return
        rows = max(2, height - 1)  # the last line is the x axis
        steps = [p[0] for p in train] + [p[0] for p in val]
        x0 = min(min(steps), self.start_step)
        last = [series.last_step for series in (self.train, self.val) if series.last_step is not None]
        x1 = max(max(steps), *last, x0 + 1)  # the axis grows with the run (the stats panel shows progress)
        # The y range: lowest min to highest mean. The first 5% of the x axis (the fall
        # from the initial loss) does not stretch the scale; it is clipped at the top (↑).
        settled = [p[2] for p in train + val if p[0] - x0 >= 0.05 * (x1 - x0)]
        all_means = [p[2] for p in train + val]
        lo = min(p[1] for p in train + val)
        hi = max(settled) if len(settled) >= 2 else max(all_means)
        clipped = max(all_means) > hi
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        labels = axis_labels(lo, hi)
        labels[0] += "↑" if clipped else ""
        gutter = max(len(s) for s in labels) + 2
        cols = max(4, width - gutter)
        canvas = BrailleCanvas(cols, rows)

        def px(step: float) -> int:
            return min(canvas.width - 1, int((step - x0) / (x1 - x0) * (canvas.width - 1) + 0.5))

        def py(value: float) -> int:
            value = min(max(value, lo), hi)
            return int((hi - value) / (hi - lo) * (canvas.height - 1) + 0.5)

        def columns(points: list[tuple[float, float, float, float]]) -> dict[int, tuple[float, float, float]]:
            # re-bucket onto pixel columns: min, mean (weighted equally per bucket), max
            acc: dict[int, list[float]] = {}
            for step, vmin, vmean, vmax in points:
                a = acc.setdefault(px(step), [math.inf, 0.0, 0.0, -math.inf])
                a[0], a[1], a[2], a[3] = min(a[0], vmin), a[1] + vmean, a[2] + 1, max(a[3], vmax)
            return {x: (a[0], a[1] / a[2], a[3]) for x, a in acc.items()}

        band, line = canvas.layer(self.BAND), canvas.layer(self.TRAIN)
        cols_train = columns(train)
        prev: tuple[int, int] | None = None
        for x in sorted(cols_train):
            vmin, vmean, _ = cols_train[x]
            canvas.dot(band, x, py(vmin))
            y = py(vmean)
            canvas.segment(line, *(prev or (x, y)), x, y)
            prev = (x, y)
        vlayer = canvas.layer(self.VAL)
        cols_val = columns(val)
        prev = None
        for x in sorted(cols_val):
            y = py(cols_val[x][1])
            canvas.segment(vlayer, *(prev or (x, y)), x, y)
            canvas.mark(x, y, self.VAL_MARK, self.VAL)  # the legend's marker at each evaluation
            prev = (x, y)

        label_rows = {0: labels[0], (rows - 1) // 2: labels[1], rows - 1: labels[2]}
        for i, text in enumerate(canvas.lines()):
            label = label_rows.get(i, "")
            row = Text(no_wrap=True)
            row.append(label.rjust(gutter - 2) + " ┤", style="dim")
            row.append_text(text)
            yield row
        left, right = f"{x0:,.0f}", f"step {x1:,.0f}"
        axis = " " * gutter + left + " " * max(1, cols - len(left) - len(right)) + right
        yield Text(axis[:width], style="dim", no_wrap=True)


__all__ = ["BrailleCanvas", "BucketSeries", "LossChart", "axis_labels"]
