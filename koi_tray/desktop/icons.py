"""Tray and application icons, drawn with Pillow alone.

This module owns the look of koi-tray's mark: a shield carrying a koi, coloured by the
node's state, with a red badge counting pending approvals. Nothing here touches Qt or a
tray backend; callers get `PIL.Image.Image` objects (RGBA) or PNG bytes and hand them to
whichever host shows them.

Each state differs in more than colour: critical swaps the koi for an exclamation mark and
offline draws a hollow shield struck through, so the two read apart in greyscale and for
colour-blind users. Shapes are drawn on a canvas four times larger than asked and scaled
down, which gives smooth edges at 16 px without depending on Pillow's anti-aliasing.
"""

from __future__ import annotations

import enum
import functools
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

Point = tuple[float, float]
Rgb = tuple[int, int, int]

DEJAVU_BOLD = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf")
MIN_SIZE = 8
BADGE_CAP = 10

_SUPERSAMPLE = 4
_WHITE: Rgb = (255, 255, 255)
_BADGE_RED: Rgb = (220, 38, 38)
_APP_BLUE: Rgb = (24, 86, 140)
_KOI_ORANGE: Rgb = (242, 112, 32)
_KOI_EYE: Rgb = (40, 40, 48)


class IconState(enum.Enum):
    """What the tray icon tells the user at a glance."""

    OK = "ok"
    ATTENTION = "attention"
    CRITICAL = "critical"
    IDLE = "idle"
    OFFLINE = "offline"


_STATE_COLOURS: dict[IconState, Rgb] = {
    IconState.OK: (46, 160, 67),
    IconState.ATTENTION: (236, 160, 0),
    IconState.CRITICAL: (214, 40, 40),
    IconState.IDLE: (138, 138, 138),
    IconState.OFFLINE: (128, 128, 128),
}


def render_icon(state: IconState, pending: int = 0, size: int = 64) -> Image.Image:
    """Draw the tray icon for `state` with a badge counting `pending` approvals.

    Counts above nine show as "9+". Results are cached; each call returns a fresh copy, so
    the caller may modify it.

    Args:
        state: The node state the icon shows.
        pending: Approvals waiting for the user; 0 draws no badge.
        size: Edge length in pixels of the square image.

    Returns:
        An RGBA image of `size` by `size` pixels.

    Raises:
        ValueError: `pending` is negative or `size` is below 8.
    """
    if pending < 0:
        raise ValueError(f"pending must not be negative, got {pending}")
    _check_size(size)

    return _render_cached(state, min(pending, BADGE_CAP), size).copy()


def render_app_icon(size: int) -> Image.Image:
    """Draw the neutral application icon used by menus, launchers and the About box.

    Raises:
        ValueError: `size` is below 8.
    """
    _check_size(size)
    return _render_app_cached(size).copy()


def icon_png_bytes(state: IconState, pending: int = 0, size: int = 64) -> bytes:
    """Encode `render_icon(state, pending, size)` as PNG.

    Raises:
        ValueError: As `render_icon`.
    """
    buffer = io.BytesIO()
    render_icon(state, pending, size).save(buffer, format="PNG")
    return buffer.getvalue()


def badge_label(pending: int) -> str:
    """Return the text the badge shows for `pending` approvals: "" for none, "9+" above nine.

    Menus and tooltips use it too, so they count the same way the icon does.
    """
    if pending <= 0:
        return ""
    return "9+" if pending >= BADGE_CAP else str(pending)


def _check_size(size: int) -> None:
    if size < MIN_SIZE:
        raise ValueError(f"icon size must be at least {MIN_SIZE} px, got {size}")


@functools.lru_cache(maxsize=256)
def _render_cached(state: IconState, pending: int, size: int) -> Image.Image:
    canvas = _Canvas(size)
    colour = _STATE_COLOURS[state]

    if state is IconState.OFFLINE:
        canvas.hollow_shield(colour)
        canvas.slash(colour)
    else:
        canvas.shield(colour)
        if state is IconState.CRITICAL:
            canvas.exclamation(_WHITE)
        else:
            canvas.koi(_WHITE)

    label = badge_label(pending)
    if label:
        canvas.badge(label)

    logger.debug("rendered %s icon, %s px, badge %s", state.value, size, pending)
    return canvas.finish()


@functools.lru_cache(maxsize=16)
def _render_app_cached(size: int) -> Image.Image:
    canvas = _Canvas(size)
    canvas.shield(_APP_BLUE)
    canvas.koi(_WHITE, spots=_KOI_ORANGE, eyes=size >= 48)
    return canvas.finish()


@functools.lru_cache(maxsize=32)
def _badge_font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    if DEJAVU_BOLD.exists():
        return ImageFont.truetype(str(DEJAVU_BOLD), pixels)
    logger.debug("%s not found, badge text uses Pillow's default font", DEJAVU_BOLD)
    return ImageFont.load_default(size=pixels)


def _cubic(p0: Point, p1: Point, p2: Point, p3: Point, steps: int = 24) -> list[Point]:
    points = []
    for i in range(1, steps + 1):
        t = i / steps
        u = 1 - t
        x = u**3 * p0[0] + 3 * u * u * t * p1[0] + 3 * u * t * t * p2[0] + t**3 * p3[0]
        y = u**3 * p0[1] + 3 * u * u * t * p1[1] + 3 * u * t * t * p2[1] + t**3 * p3[1]
        points.append((x, y))
    return points


def _shield_outline(inset: float = 0.0) -> list[Point]:
    """Trace the shield in unit coordinates, shrunk by `inset` on every side."""
    top, side, bottom = 0.11 + inset, 0.87 - inset, 0.95 - 1.6 * inset
    shoulder = 0.5 - inset * 0.6

    right = [(0.5, top - 0.03 + inset * 0.3), (side, top)]
    right += _cubic((side, top), (side, 0.34), (side, shoulder), (side, shoulder), 4)
    bend = ((side, 0.76 - inset), (0.66 - 0.4 * inset, 0.88 - 1.6 * inset))
    right += _cubic((side, shoulder), *bend, (0.5, bottom))
    left = [(1 - x, y) for x, y in reversed(right[:-1])]
    return right + left


class _Canvas:
    """A supersampled RGBA drawing surface in unit coordinates (0..1 on both axes)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.scale = size * _SUPERSAMPLE
        self.image = Image.new("RGBA", (self.scale, self.scale), (0, 0, 0, 0))
        self.draw = ImageDraw.Draw(self.image)

    def px(self, points: Sequence[Point]) -> list[Point]:
        return [(x * self.scale, y * self.scale) for x, y in points]

    def shield(self, colour: Rgb) -> None:
        rim = tuple(int(c * 0.72) for c in colour)
        self.draw.polygon(
            self.px(_shield_outline()),
            fill=colour,
            outline=rim,
            width=max(1, round(0.035 * self.scale)),
        )

    def hollow_shield(self, colour: Rgb) -> None:
        self.draw.polygon(self.px(_shield_outline()), fill=colour)
        self.draw.polygon(self.px(_shield_outline(inset=0.1)), fill=(0, 0, 0, 0))

    def slash(self, colour: Rgb) -> None:
        line = self.px([(0.22, 0.18), (0.78, 0.8)])
        self.draw.line(line, fill=(0, 0, 0, 0), width=round(0.2 * self.scale))
        self.draw.line(line, fill=colour, width=round(0.1 * self.scale))
        for x, y in line:
            radius = 0.05 * self.scale
            self.draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)

    def exclamation(self, colour: Rgb) -> None:
        self.draw.rounded_rectangle(
            self.px([(0.435, 0.22), (0.565, 0.6)]), radius=0.065 * self.scale, fill=colour
        )
        self.draw.ellipse(self.px([(0.43, 0.67), (0.57, 0.81)]), fill=colour)

    def koi(self, colour: Rgb, spots: Rgb | None = None, eyes: bool = False) -> None:
        body = _koi_body()
        self.draw.polygon(self.px(body), fill=colour)
        for fin in _koi_fins():
            self.draw.polygon(self.px(fin), fill=colour)

        if spots is not None:
            layer = Image.new("RGBA", self.image.size, (0, 0, 0, 0))
            layer_draw = ImageDraw.Draw(layer)
            layer_draw.ellipse(self.px([(0.4, 0.2), (0.56, 0.34)]), fill=spots)
            layer_draw.ellipse(self.px([(0.47, 0.38), (0.64, 0.5)]), fill=spots)
            layer_draw.ellipse(self.px([(0.36, 0.5), (0.5, 0.6)]), fill=spots)
            mask = Image.new("L", self.image.size, 0)
            ImageDraw.Draw(mask).polygon(self.px(body), fill=255)
            self.image.paste(layer, (0, 0), ImageChops.multiply(layer.getchannel("A"), mask))

        if eyes:
            for x in (0.455, 0.545):
                self.draw.ellipse(self.px([(x - 0.018, 0.245), (x + 0.018, 0.281)]), fill=_KOI_EYE)

    def badge(self, text: str) -> None:
        diameter = 0.56 if self.size < 32 else 0.5
        box = self.px([(1 - diameter, 1 - diameter), (1, 1)])
        ring = 0.04 * self.scale
        self.draw.ellipse(box, fill=_WHITE)
        inner = [(box[0][0] + ring, box[0][1] + ring), (box[1][0] - ring, box[1][1] - ring)]
        self.draw.ellipse(inner, fill=_BADGE_RED)

        share = 0.74 if len(text) == 1 else 0.56
        font = _badge_font(round(diameter * share * self.scale))
        left, top, right, bottom = self.draw.textbbox((0, 0), text, font=font)
        centre_x = (box[0][0] + box[1][0]) / 2
        centre_y = (box[0][1] + box[1][1]) / 2
        origin = (centre_x - (left + right) / 2, centre_y - (top + bottom) / 2)
        self.draw.text(origin, text, font=font, fill=_WHITE)

    def finish(self) -> Image.Image:
        return self.image.resize((self.size, self.size), Image.Resampling.LANCZOS)


def _koi_centre(t: float) -> float:
    """Give the x of the koi's spine at `t` (0 = snout, 1 = tail root): a gentle S."""
    return 0.5 + 0.03 * math.sin(math.pi * (1.6 * t - 0.3))


def _koi_body() -> list[Point]:
    head, root = 0.17, 0.64
    steps = 20
    right: list[Point] = []
    left: list[Point] = []
    for i in range(steps + 1):
        t = i / steps
        half = 0.11 * math.sin(math.pi * t**0.7) ** 0.7 + 0.018 * t
        y = head + (root - head) * t
        right.append((_koi_centre(t) + half, y))
        left.append((_koi_centre(t) - half, y))

    tail_x = _koi_centre(1.0)
    tail = [(tail_x + 0.11, 0.8), (tail_x, 0.72), (tail_x - 0.12, 0.79)]
    return right + tail + list(reversed(left))


def _koi_fins() -> list[list[Point]]:
    fins = []
    for sign in (1, -1):
        x = _koi_centre(0.32) + sign * 0.1
        fins.append([(x, 0.31), (x + sign * 0.085, 0.4), (x - sign * 0.01, 0.39)])
    return fins
