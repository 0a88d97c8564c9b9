"""Small charts drawn with Pillow: lines, error bars, scatter points, labelled axes and a legend.

Enough for training curves, estimator comparisons and latent scatters without a plotting
library in the core dependencies. Numbers in, a PIL image out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]


def font(size: int = 14) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


@dataclass
class Series:
    x: Sequence[float]
    y: Sequence[float]
    label: str = ""
    error: Sequence[float] | None = None  # half-width of an error bar at each point
    color: str | None = None
    style: str = "line"  # line | points | line+points
    point_colors: Sequence[str] | None = None  # per-point colours (scatter by class)
    radius: float = 3.0


@dataclass
class Chart:
    title: str = ""
    xlabel: str = ""
    ylabel: str = ""
    series: list[Series] = field(default_factory=list)
    logx: bool = False
    width: int = 760
    height: int = 460
    legend: list[tuple[str, str]] | None = None  # extra (label, colour) entries

    def add(self, *args, **kwargs) -> "Chart":
        self.series.append(Series(*args, **kwargs))
        return self

    def render(self) -> Image.Image:
        image = Image.new("RGB", (self.width, self.height), "white")
        draw = ImageDraw.Draw(image)
        title_font, label_font, tick_font = font(17), font(14), font(12)
        left, right, top, bottom = 78, 20, 40 if self.title else 16, 58
        plot_w, plot_h = self.width - left - right, self.height - top - bottom

        points = [(x, y, e) for s in self.series
                  for x, y, e in zip(s.x, s.y, s.error or [0.0] * len(s.x))
                  if _finite(x, y) and (not self.logx or x > 0)]
        if not points:
            draw.text((left + 10, top + plot_h // 2), "no data", fill="black", font=label_font)
            return image
        xs = [math.log10(p[0]) if self.logx else p[0] for p in points]
        ys_low = [p[1] - abs(p[2]) for p in points]
        ys_high = [p[1] + abs(p[2]) for p in points]
        x_lo, x_hi = _pad_range(min(xs), max(xs), 0.02)
        y_lo, y_hi = _pad_range(min(ys_low), max(ys_high), 0.05)

        def to_px(x: float, y: float) -> tuple[float, float]:
            xv = math.log10(x) if self.logx else x
            px = left + (xv - x_lo) / (x_hi - x_lo) * plot_w
            py = top + (1 - (y - y_lo) / (y_hi - y_lo)) * plot_h
            return px, py

        # axes, grid and ticks
        draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
        for tick in _ticks(y_lo, y_hi):
            _, py = to_px(10 ** x_lo if self.logx else x_lo, tick)
            draw.line([left, py, left + plot_w, py], fill="#e6e6e6")
            draw.line([left - 4, py, left, py], fill="black")
            text = _fmt(tick)
            tw = draw.textlength(text, font=tick_font)
            draw.text((left - 7 - tw, py - 7), text, fill="black", font=tick_font)
        x_ticks = [10 ** t for t in range(math.ceil(x_lo), math.floor(x_hi) + 1)] if self.logx \
            else _ticks(x_lo, x_hi)
        for tick in x_ticks:
            px, _ = to_px(tick, y_lo)
            draw.line([px, top, px, top + plot_h], fill="#e6e6e6")
            draw.line([px, top + plot_h, px, top + plot_h + 4], fill="black")
            text = _fmt(tick)
            tw = draw.textlength(text, font=tick_font)
            draw.text((px - tw / 2, top + plot_h + 7), text, fill="black", font=tick_font)
        draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")

        # data
        legend = []
        for index, s in enumerate(self.series):
            color = s.color or PALETTE[index % len(PALETTE)]
            pairs = [(x, y, e) for x, y, e in zip(s.x, s.y, s.error or [0.0] * len(s.x))
                     if _finite(x, y) and (not self.logx or x > 0)]
            pixels = [to_px(x, y) for x, y, _ in pairs]
            if "line" in s.style and len(pixels) > 1:
                draw.line(pixels, fill=color, width=2, joint="curve")
            if s.error is not None:
                for (x, y, e), (px, _) in zip(pairs, pixels):
                    _, y1 = to_px(x, y - abs(e))
                    _, y2 = to_px(x, y + abs(e))
                    draw.line([px, y1, px, y2], fill=color, width=1)
                    draw.line([px - 3, y1, px + 3, y1], fill=color)
                    draw.line([px - 3, y2, px + 3, y2], fill=color)
            if "points" in s.style:
                colors = s.point_colors or [color] * len(pixels)
                r = s.radius
                for (px, py), c in zip(pixels, colors):
                    draw.ellipse([px - r, py - r, px + r, py + r], fill=c)
            if s.label:
                legend.append((s.label, color))
        legend += self.legend or []

        # labels and legend
        if self.title:
            tw = draw.textlength(self.title, font=title_font)
            draw.text(((self.width - tw) / 2, 10), self.title, fill="black", font=title_font)
        if self.xlabel:
            tw = draw.textlength(self.xlabel, font=label_font)
            draw.text((left + (plot_w - tw) / 2, self.height - 26), self.xlabel, fill="black",
                      font=label_font)
        if self.ylabel:
            tw = int(draw.textlength(self.ylabel, font=label_font)) + 4
            label = Image.new("RGB", (tw, 20), "white")
            ImageDraw.Draw(label).text((2, 2), self.ylabel, fill="black", font=label_font)
            label = label.rotate(90, expand=True)
            image.paste(label, (6, int(top + (plot_h - tw) / 2)))
        if legend:
            line_h = 18
            box_w = max(draw.textlength(text, font=label_font) for text, _ in legend) + 34
            box_h = line_h * len(legend) + 8
            x0, y0 = left + plot_w - box_w - 8, top + 8
            draw.rectangle([x0, y0, x0 + box_w, y0 + box_h], fill="white", outline="#999999")
            for row, (text, color) in enumerate(legend):
                yy = y0 + 6 + row * line_h
                draw.line([x0 + 6, yy + 8, x0 + 24, yy + 8], fill=color, width=3)
                draw.text((x0 + 30, yy), text, fill="black", font=label_font)
        return image


def _finite(*values: float) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _pad_range(lo: float, hi: float, pad: float) -> tuple[float, float]:
    if hi - lo < 1e-12:
        span = abs(lo) * 0.1 or 1.0
        return lo - span, hi + span
    extra = (hi - lo) * pad
    return lo - extra, hi + extra


def _ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """'Nice' tick values (1, 2, 5 x 10^k steps) inside [lo, hi]."""
    raw = (hi - lo) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.ceil(lo / step) * step
    count = int((hi - first) / step + 1e-9) + 1
    return [first + i * step for i in range(count)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e5 or abs(value) < 1e-3:
        return f"{value:.0e}"
    text = f"{value:.4f}".rstrip("0").rstrip(".")
    return text if len(text) < 9 else f"{value:.3g}"
