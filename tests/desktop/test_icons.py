"""Tests for the Pillow-drawn tray and application icons."""

from __future__ import annotations

import colorsys
import itertools
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageStat

from koi_tray.desktop import icons
from koi_tray.desktop.icons import (
    IconState,
    badge_label,
    icon_png_bytes,
    render_app_icon,
    render_icon,
)

REPO = Path(__file__).resolve().parents[2]
TRAY_SIZES = (16, 22, 32, 64)
EXPECTED_FAMILY = {
    IconState.OK: "green",
    IconState.ATTENTION: "amber",
    IconState.CRITICAL: "red",
    IconState.IDLE: "grey",
    IconState.OFFLINE: "grey",
}


def colour_family(rgb: tuple[int, int, int]) -> str:
    """Name the colour a person would call this pixel, or "white" for the glyphs."""
    hue, saturation, value = colorsys.rgb_to_hsv(*(c / 255 for c in rgb))
    if saturation < 0.15:
        return "white" if value > 0.9 else "grey"

    degrees = hue * 360
    if degrees < 15 or degrees > 345:
        return "red"
    if 25 <= degrees <= 55:
        return "amber"
    if 90 <= degrees <= 160:
        return "green"
    return "other"


def dominant_family(image: Image.Image) -> str:
    """Return the most common colour family among the icon's opaque, non-white pixels."""
    counts: Counter[str] = Counter()
    for r, g, b, a in rgba_pixels(image):
        if a >= 200:
            counts[colour_family((r, g, b))] += 1
    del counts["white"]
    return counts.most_common(1)[0][0]


def rgba_pixels(image: Image.Image) -> list[tuple[int, int, int, int]]:
    """List the pixels of an RGBA image, row by row."""
    data = image.tobytes()
    return [tuple(data[i : i + 4]) for i in range(0, len(data), 4)]


def mean_difference(first: Image.Image, second: Image.Image) -> float:
    """Average absolute per-channel difference, 0 (identical) to 255."""
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / len(first.getbands())


def on_white_greyscale(image: Image.Image) -> Image.Image:
    """Show the icon the way a greyscale screenshot on a light panel would."""
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("L")


def coverage(image: Image.Image) -> float:
    """Return the share of pixels that are clearly painted."""
    alpha = image.getchannel("A").tobytes()
    return sum(1 for a in alpha if a >= 128) / len(alpha)


@pytest.mark.parametrize("size", TRAY_SIZES)
@pytest.mark.parametrize("state", list(IconState))
def test_each_state_renders_in_its_colour(state: IconState, size: int) -> None:
    image = render_icon(state, size=size)

    assert image.mode == "RGBA"
    assert image.size == (size, size)
    assert dominant_family(image) == EXPECTED_FAMILY[state]


@pytest.mark.parametrize("size", TRAY_SIZES)
def test_states_are_pairwise_distinguishable(size: int) -> None:
    rendered = {state: render_icon(state, size=size) for state in IconState}

    for first, second in itertools.combinations(IconState, 2):
        difference = mean_difference(rendered[first], rendered[second])
        assert difference > 8, f"{first.name} and {second.name} look alike at {size} px"


@pytest.mark.parametrize("size", TRAY_SIZES)
@pytest.mark.parametrize("other", [IconState.CRITICAL, IconState.IDLE])
def test_offline_differs_in_shape_not_only_colour(other: IconState, size: int) -> None:
    offline = render_icon(IconState.OFFLINE, size=size)
    compared = render_icon(other, size=size)

    grey_difference = mean_difference(on_white_greyscale(offline), on_white_greyscale(compared))
    assert grey_difference > 10
    assert coverage(offline) < 0.75 * coverage(compared)


@pytest.mark.parametrize("size", TRAY_SIZES)
def test_badge_paints_only_the_corner(size: int) -> None:
    plain = render_icon(IconState.ATTENTION, size=size)
    badged = render_icon(IconState.ATTENTION, pending=3, size=size)
    half = size // 2
    corner = (half, half, size, size)
    opposite = (0, 0, half, half)

    assert mean_difference(plain.crop(corner), badged.crop(corner)) > 20
    assert mean_difference(plain.crop(opposite), badged.crop(opposite)) < 1

    pixels = rgba_pixels(badged.crop(corner))
    families = Counter(colour_family(p[:3]) for p in pixels if p[3] > 200)
    assert families["red"] > 0
    assert families["white"] > 0


@pytest.mark.parametrize(
    ("pending", "label"), [(0, ""), (1, "1"), (9, "9"), (10, "9+"), (250, "9+")]
)
def test_badge_label_counts_to_nine_plus(pending: int, label: str) -> None:
    assert badge_label(pending) == label


def test_badge_caps_at_nine_plus() -> None:
    nine = render_icon(IconState.OK, pending=9, size=32)
    ten = render_icon(IconState.OK, pending=10, size=32)
    many = render_icon(IconState.OK, pending=250, size=32)

    assert mean_difference(nine, ten) > 0
    assert mean_difference(ten, many) == 0


def test_each_count_draws_its_own_number() -> None:
    badges = [render_icon(IconState.OK, pending=n, size=64) for n in range(1, 10)]

    for first, second in itertools.combinations(badges, 2):
        assert mean_difference(first, second) > 0


def test_render_is_deterministic_across_processes() -> None:
    script = (
        "import sys; from koi_tray.desktop.icons import IconState, icon_png_bytes; "
        "sys.stdout.buffer.write(icon_png_bytes(IconState.ATTENTION, pending=12, size=32))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, check=True
    ).stdout

    assert other == icon_png_bytes(IconState.ATTENTION, pending=12, size=32)
    assert other.startswith(b"\x89PNG\r\n\x1a\n")


def test_returned_images_do_not_share_the_cache() -> None:
    first = render_icon(IconState.OK, size=32)
    first.paste((0, 0, 0, 255), (0, 0, 32, 32))

    assert dominant_family(render_icon(IconState.OK, size=32)) == "green"


def test_app_icon_is_neutral_and_distinct_from_states() -> None:
    app = render_app_icon(64)

    assert dominant_family(app) not in set(EXPECTED_FAMILY.values())
    for state in IconState:
        assert mean_difference(app, render_icon(state, size=64)) > 8


def test_committed_master_png_matches_renderer() -> None:
    master = Image.open(REPO / "koi_tray" / "assets" / "koi-tray.png").convert("RGBA")

    assert master.size == (256, 256)
    assert mean_difference(master, render_app_icon(256)) < 0.5, "re-run scripts/render-icons"


@pytest.mark.parametrize("bad", [{"pending": -1}, {"size": 4}])
def test_rejects_nonsense_arguments(bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        render_icon(IconState.OK, **bad)


@pytest.fixture
def without_dejavu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Pretend DejaVu is not installed, as on Windows and macOS; caches reset both ways."""
    icons._render_cached.cache_clear()
    icons._badge_font.cache_clear()
    monkeypatch.setattr(icons, "DEJAVU_BOLD", tmp_path / "missing.ttf")
    yield
    icons._render_cached.cache_clear()
    icons._badge_font.cache_clear()


@pytest.mark.usefixtures("without_dejavu")
def test_badge_text_falls_back_to_pillow_font() -> None:
    plain = render_icon(IconState.IDLE, size=64)
    five = render_icon(IconState.IDLE, pending=5, size=64)
    six = render_icon(IconState.IDLE, pending=6, size=64)

    assert mean_difference(plain, five) > 0
    assert mean_difference(five, six) > 0
