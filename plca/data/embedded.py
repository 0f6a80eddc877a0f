"""The embedded domain pair: procedural street scenes, a "synthetic" source and a "real" target.

Both domains draw the same kind of scene (skyline, road and sidewalks to a vanishing point, terrain, walls and
fences, trees, poles with signs and lights, vehicles, persons, riders) into a label map first, then render it:

- source (GTA5 layout): flat palette colours, small uniform noise, crisp edges;
- target (Cityscapes layout): other colours per class, textures, sky gradient, gain, colour cast, side shading,
  gamma, blur, sensor noise, an ego-vehicle hood (ignore), and shifted layout statistics (higher horizon, more
  and smaller vehicles, more trees, fewer poles).

One knob, `shift` in [0, 1], scales every difference; at 0 the two domains are drawn alike. Each image's random
generator comes from (seed, domain, split, index), so the output does not depend on the number of workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from plca.data.labels import CLASS_NAMES, IGNORE_INDEX, NUM_CLASSES, TRAINID_TO_ID
from plca.io import write_image

# Train ids, named for readability of the scene code.
ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY = range(11)
PERSON, RIDER, CAR, TRUCK, BUS, TRAIN, MOTORCYCLE, BICYCLE = range(11, 19)
#: Classes the scenes draw (train is never drawn: it is rare in Cityscapes and needs rails).
DRAWN_CLASSES = tuple(c for c in range(NUM_CLASSES) if c != TRAIN)
# Cityscapes label id written for the target's ego-vehicle hood (id 1 "ego vehicle", ignored in training).
EGO_VEHICLE_ID = 1

DOMAIN_CODES = {"source": 0, "target": 1}
SPLIT_CODES = {"train": 0, "val": 1}
CITYSCAPES_FRAME = 19  # Cityscapes annotates the 20th frame of each 30-frame snippet: names end in _000019

# Appearance marks that change colour but not the label.
DETAIL_NONE, DETAIL_WINDOW, DETAIL_DARK, DETAIL_LAMP, DETAIL_MARKING, DETAIL_SKIN = range(6)

# Flat "game" colours of the source, RGB.
SOURCE_COLOURS = {
    ROAD: (92, 90, 98), SIDEWALK: (176, 164, 150), BUILDING: (158, 122, 96), WALL: (190, 178, 140),
    FENCE: (146, 108, 72), POLE: (112, 112, 120), LIGHT: (40, 44, 40), SIGN: (230, 200, 40),
    VEGETATION: (62, 150, 52), TERRAIN: (150, 170, 84), SKY: (100, 170, 240), PERSON: (180, 60, 60),
    RIDER: (60, 60, 180), CAR: (40, 80, 200), TRUCK: (210, 210, 196), BUS: (214, 70, 40), TRAIN: (90, 90, 90),
    MOTORCYCLE: (60, 60, 72), BICYCLE: (30, 110, 170),
}  # fmt: skip
# "Real" colours the target moves toward as shift grows: duller, darker, other hues.
TARGET_COLOURS = {
    ROAD: (72, 74, 84), SIDEWALK: (140, 142, 150), BUILDING: (120, 116, 118), WALL: (150, 140, 124),
    FENCE: (110, 104, 92), POLE: (82, 84, 80), LIGHT: (30, 30, 34), SIGN: (90, 120, 190),
    VEGETATION: (54, 92, 46), TERRAIN: (120, 124, 74), SKY: (186, 204, 222), PERSON: (70, 60, 66),
    RIDER: (60, 66, 74), CAR: (90, 96, 110), TRUCK: (150, 150, 146), BUS: (170, 150, 60), TRAIN: (90, 90, 90),
    MOTORCYCLE: (50, 50, 56), BICYCLE: (60, 60, 60),
}  # fmt: skip
# Classes whose instances take one of several colours (cars come in many colours, people wear clothes).
INSTANCE_COLOURS = {
    CAR: ((40, 80, 200), (200, 30, 30), (230, 230, 230), (30, 30, 34), (160, 164, 170), (30, 120, 60)),
    PERSON: ((180, 60, 60), (40, 50, 110), (200, 180, 60), (60, 60, 60), (220, 220, 210)),
    RIDER: ((60, 60, 180), (200, 120, 30), (40, 40, 40)),
    BUS: ((214, 70, 40), (230, 200, 40), (220, 220, 220)),
    SIGN: ((230, 200, 40), (200, 30, 30), (30, 80, 200), (235, 235, 235)),
}
# Per-instance brightness jitter of the source palette (fraction), so that a class is not one exact colour.
SOURCE_JITTER = 0.08
SOURCE_NOISE = 4  # +- uniform noise of the source, in grey levels
# Vehicle size caps, fractions of the image height and width: near trucks and buses would fill the frame.
VEHICLE_MAX_H, VEHICLE_MAX_W = 0.4, 0.35
# Thin things drawn at least this large (pixels), so that a network at output stride 8 can still learn them at
# 64x128; persons are drawn taller than true scale (in road half-widths) for the same reason.
POLE_MIN_HALF_WIDTH = 1.5
THING_MIN_SIZE = 4.0
PERSON_HEIGHT = 0.55
# Depth range of standing objects (0 = horizon, 1 = bottom row; > 1 partly below the frame); farther ones would be
# a pixel or two, below what a network at output stride 8 can see.
DEPTH_MIN, DEPTH_MAX = 0.15, 1.1


@dataclass
class EmbeddedConfig:
    """Size, counts and domain gap of the embedded pair.

    shift: strength of every source -> target difference (appearance and layout); 0 draws both domains alike,
    0.6 a realistic gap (measured with a 0.7M-parameter DeepLab-v2, 1000 Adam steps: source-only 62 mIoU on
    source val and 38 on target val, oracle 57); at 1 source-only falls far below (prototype: 25 vs oracle 70).
    """

    seed: int = 0
    height: int = 64
    width: int = 128
    n_source_train: int = 2000
    n_source_val: int = 100
    n_target_train: int = 2000
    n_target_val: int = 100
    shift: float = 0.6
    n_cities: int = 3
    workers: int = 1

    def __post_init__(self) -> None:
        if self.height < 32 or self.width < 32:
            raise ValueError(f"height and width must be at least 32 pixels, got {self.height}x{self.width}")
        counts = (self.n_source_train, self.n_source_val, self.n_target_train, self.n_target_val)
        if min(counts) < 1:
            raise ValueError(f"every split needs at least one image, got {counts}")
        if self.n_source_train + self.n_source_val > 99999:
            raise ValueError("the GTA5 layout numbers images with 5 digits: at most 99999 source images")
        if not 0.0 <= self.shift <= 1.0:
            raise ValueError(f"shift must be in [0, 1], got {self.shift}")
        if self.n_cities < 1 or self.workers < 1:
            raise ValueError(f"n_cities and workers must be >= 1, got {self.n_cities}, {self.workers}")


@dataclass
class Layout:
    """Layout statistics of one domain (means of Poisson counts, fractions of the image)."""

    horizon: tuple[float, float]  # horizon row range, fraction of the height
    n_vehicles: float
    vehicle_scale: float  # size multiplier of vehicles
    depth_power: float  # >1 puts objects farther away (smaller)
    n_trees: float
    n_poles: float
    n_persons: float
    n_riders: float
    p_wall: float
    p_fence: float
    p_terrain: float
    hood: float  # ego-vehicle hood height, fraction of the image height


SOURCE_LAYOUT = Layout(
    horizon=(0.40, 0.52), n_vehicles=2.5, vehicle_scale=1.0, depth_power=1.3, n_trees=1.5, n_poles=3.0,
    n_persons=2.0, n_riders=0.7, p_wall=0.5, p_fence=0.4, p_terrain=0.4, hood=0.0,
)  # fmt: skip
# Where the target layout goes at shift = 1.
TARGET_LAYOUT = Layout(
    horizon=(0.30, 0.42), n_vehicles=5.0, vehicle_scale=0.75, depth_power=1.8, n_trees=3.5, n_poles=1.2,
    n_persons=3.0, n_riders=1.0, p_wall=0.3, p_fence=0.6, p_terrain=0.6, hood=0.08,
)  # fmt: skip


def layout_for(domain: str, shift: float) -> Layout:
    """Source layout, or the target's: the source moved toward TARGET_LAYOUT by `shift`."""
    if domain == "source":
        return SOURCE_LAYOUT
    mix = {}
    for key, a in asdict(SOURCE_LAYOUT).items():
        b = getattr(TARGET_LAYOUT, key)
        if isinstance(a, tuple):
            mix[key] = tuple(x + shift * (y - x) for x, y in zip(a, b, strict=True))
        else:
            mix[key] = a + shift * (b - a)
    return Layout(**mix)


# ---------------------------------------------------------------- scene (labels, instances, appearance marks)


class Canvas:
    """Label, instance and detail maps painted back to front; each instance has a class and a source colour."""

    def __init__(self, h: int, w: int) -> None:
        self.h, self.w = h, w
        self.label = np.full((h, w), SKY, np.uint8)
        self.inst = np.zeros((h, w), np.int32)
        self.detail = np.zeros((h, w), np.uint8)
        self.classes: list[int] = [SKY]
        self.colours: list[tuple[float, float, float]] = [SOURCE_COLOURS[SKY]]

    def new(self, cls: int, rng: np.random.Generator) -> int:
        choices = INSTANCE_COLOURS.get(cls)
        base = choices[int(rng.integers(len(choices)))] if choices else SOURCE_COLOURS[cls]
        gain = 1.0 + rng.uniform(-SOURCE_JITTER, SOURCE_JITTER)
        self.classes.append(cls)
        self.colours.append(tuple(float(c) * gain for c in base))
        return len(self.classes) - 1

    def poly(self, pts: np.ndarray, k: int) -> None:
        pts = [np.round(pts).astype(np.int32)]
        cv2.fillPoly(self.label, pts, int(self.classes[k]))
        cv2.fillPoly(self.inst, pts, int(k))

    def rect(self, x0: float, y0: float, x1: float, y1: float, k: int) -> None:
        """Filled rectangle covering [x0, x1) x [y0, y1) in float pixels, at least one pixel wide and tall."""
        xa, ya = int(round(x0)), int(round(y0))
        xb, yb = max(int(round(x1)), xa + 1), max(int(round(y1)), ya + 1)
        xa, xb, ya, yb = max(xa, 0), min(xb, self.w), max(ya, 0), min(yb, self.h)
        if xa < xb and ya < yb:
            self.label[ya:yb, xa:xb] = self.classes[k]
            self.inst[ya:yb, xa:xb] = k

    def ellipse(self, cx: float, cy: float, rx: float, ry: float, k: int) -> None:
        c, axes = (int(round(cx)), int(round(cy))), (max(int(round(rx)), 1), max(int(round(ry)), 1))
        cv2.ellipse(self.label, c, axes, 0, 0, 360, int(self.classes[k]), -1)
        cv2.ellipse(self.inst, c, axes, 0, 0, 360, int(k), -1)

    def mark(self, x0: float, y0: float, x1: float, y1: float, kind: int, where: int | None = None) -> None:
        """Appearance-only mark (window, tyre, lamp ...) on the pixels of instance `where` (or any)."""
        xa, ya = max(int(round(x0)), 0), max(int(round(y0)), 0)
        xb, yb = min(max(int(round(x1)), xa + 1), self.w), min(max(int(round(y1)), ya + 1), self.h)
        if xa < xb and ya < yb:
            region = self.detail[ya:yb, xa:xb]
            if where is None:
                region[...] = kind
            else:
                region[self.inst[ya:yb, xa:xb] == where] = kind


@dataclass
class Street:
    """Perspective of one scene: horizon row, vanishing column, road half-width at the bottom row."""

    h: int
    w: int
    horizon: float
    vx: float
    half_road: float
    sidewalk: float  # sidewalk width at the bottom row, pixels

    def depth(self, y: float) -> float:
        """Perspective scale of a ground row: 0 at the horizon, 1 at the bottom row."""
        return max(y - self.horizon, 0.0) / (self.h - self.horizon)

    def road_half(self, y: float) -> float:
        return self.half_road * self.depth(y)

    def ground_row(self, s: float) -> float:
        return self.horizon + s * (self.h - self.horizon)


def _wedge(st: Street, inner: float, outer: float, side: int) -> np.ndarray:
    """Ground polygon between two lines from the vanishing point, `inner`/`outer` = offsets at the bottom row."""
    far = 4 * st.h  # extend below the image so the wedge reaches the bottom edge whatever its slope
    y = st.horizon
    pts = [
        (st.vx, y),
        (st.vx + side * inner * far / (st.h - y), y + far),
        (st.vx + side * outer * far / (st.h - y), y + far),
    ]
    return np.array(pts, np.float64)


def _skyline(cv: Canvas, st: Street, rng: np.random.Generator) -> None:
    x = -rng.uniform(0, 0.1) * st.w
    while x < st.w:
        bw = rng.uniform(0.08, 0.25) * st.w
        side = abs(x + bw / 2 - st.vx) / st.w  # buildings near the sides are closer, hence taller
        top = st.horizon - rng.uniform(0.25, 0.85) * st.horizon * (0.6 + 0.8 * side)
        k = cv.new(BUILDING, rng)
        cv.rect(x, top, x + bw, st.h, k)
        # window grid: an appearance mark, the label stays building
        sx, sy = int(rng.integers(3, 6)), int(rng.integers(3, 6))
        for wy in np.arange(top + 2, st.horizon + 0.25 * st.h, sy):
            for wx in np.arange(x + 1, x + bw - 1, sx):
                cv.mark(wx, wy, wx + max(1, sx // 2), wy + max(1, sy // 2), DETAIL_WINDOW, where=k)
        x += bw


def _ground(cv: Canvas, st: Street, lay: Layout, rng: np.random.Generator) -> None:
    for side in (-1, 1):
        outer = st.half_road + st.sidewalk
        if rng.random() < lay.p_terrain:
            cv.poly(_wedge(st, outer, outer + rng.uniform(0.2, 0.6) * st.half_road, side), cv.new(TERRAIN, rng))
        cv.poly(_wedge(st, st.half_road, outer, side), cv.new(SIDEWALK, rng))
    road = cv.new(ROAD, rng)
    cv.poly(_wedge(st, -st.half_road, st.half_road, 1), road)
    # dashed centre line: appearance only
    for s in np.arange(0.1, 1.2, 0.25):
        y0, y1 = st.ground_row(s), st.ground_row(s + 0.1)
        half = max(0.5, 0.02 * st.road_half(y1))
        cv.mark(st.vx - half, y0, st.vx + half, y1, DETAIL_MARKING, where=road)


def _side_strip(cv: Canvas, st: Street, cls: int, height: float, rng: np.random.Generator) -> None:
    """Wall or fence along the outer edge of a sidewalk, in perspective; height in road half-widths."""
    side = -1 if rng.random() < 0.5 else 1
    outer = st.half_road + st.sidewalk
    s0, s1 = rng.uniform(0.05, 0.4), rng.uniform(0.6, 1.3)
    pts = []
    for s in (s0, s1):
        y = st.ground_row(s)
        pts.append((st.vx + side * outer * s, y))
    for s in (s1, s0):
        y = st.ground_row(s)
        pts.append((st.vx + side * outer * s, y - height * st.half_road * s))
    k = cv.new(cls, rng)
    cv.poly(np.array(pts), k)
    if cls == FENCE:  # vertical bars
        for x in range(0, st.w, 2):
            cv.mark(x, 0, x + 1, st.h, DETAIL_DARK, where=k)


def _tree(cv: Canvas, st: Street, s: float, rng: np.random.Generator) -> None:
    side = -1 if rng.random() < 0.5 else 1
    y = st.ground_row(s)
    x = st.vx + side * (st.half_road + st.sidewalk * rng.uniform(0.6, 1.2)) * s
    k = cv.new(VEGETATION, rng)  # Cityscapes labels trunks as vegetation too
    trunk_h, r = 0.45 * st.half_road * s, rng.uniform(0.2, 0.35) * st.half_road * s
    cv.rect(x - max(0.5, 0.03 * st.half_road * s), y - trunk_h, x + max(0.5, 0.03 * st.half_road * s), y, k)
    cv.ellipse(x, y - trunk_h - 0.6 * r, r, r * rng.uniform(0.8, 1.3), k)
    cv.mark(x - 1, y - trunk_h, x + 1, y, DETAIL_DARK, where=k)


def _pole(cv: Canvas, st: Street, s: float, rng: np.random.Generator) -> None:
    side = -1 if rng.random() < 0.5 else 1
    y = st.ground_row(s)
    x = st.vx + side * (st.half_road + 0.15 * st.sidewalk) * s
    unit = st.half_road * s
    top = y - 0.7 * unit
    half = max(POLE_MIN_HALF_WIDTH, 0.02 * unit)
    cv.rect(x - half, top, x + half, y, cv.new(POLE, rng))
    if rng.random() < 0.5:
        k = cv.new(LIGHT, rng)
        bw = max(THING_MIN_SIZE, 0.07 * unit)
        cv.rect(x - bw / 2, top - 2.4 * bw, x + bw / 2, top, k)
        lamp = DETAIL_LAMP if rng.random() < 0.5 else DETAIL_SKIN  # red or green lamp
        cv.mark(x - bw / 2, top - 2.4 * bw, x + bw / 2, top - 1.6 * bw, lamp, where=k)
    else:
        k = cv.new(SIGN, rng)
        sw = max(THING_MIN_SIZE, 0.12 * unit)
        if rng.random() < 0.5:
            cv.rect(x - sw / 2, top - sw, x + sw / 2, top, k)
        else:
            cv.ellipse(x, top - sw / 2, sw / 2, sw / 2, k)


def _vehicle(cv: Canvas, st: Street, s: float, lay: Layout, rng: np.random.Generator) -> None:
    cls = [CAR, CAR, CAR, CAR, TRUCK, BUS][int(rng.integers(6))]
    y = st.ground_row(s)
    x = st.vx + rng.uniform(-0.85, 0.85) * st.road_half(y)
    width_f, height_f = {CAR: (0.38, 0.8), TRUCK: (0.5, 1.3), BUS: (0.55, 1.2)}[cls]
    w = width_f * st.road_half(y) * lay.vehicle_scale
    h = height_f * w
    # near trucks and buses would fill the frame: cap their size
    cap = min(VEHICLE_MAX_H * st.h / h, VEHICLE_MAX_W * st.w / w, 1.0)
    w, h = w * cap, h * cap
    k = cv.new(cls, rng)
    if cls == CAR:
        cv.rect(x - w / 2, y - 0.6 * h, x + w / 2, y, k)
        cv.rect(x - 0.35 * w, y - h, x + 0.35 * w, y - 0.55 * h, k)
        cv.mark(x - 0.3 * w, y - 0.9 * h, x + 0.3 * w, y - 0.6 * h, DETAIL_WINDOW, where=k)
    elif cls == TRUCK:
        cv.rect(x - w / 2, y - h, x + w / 2, y, k)
        cv.mark(x - 0.4 * w, y - 0.55 * h, x + 0.4 * w, y - 0.35 * h, DETAIL_WINDOW, where=k)
    else:
        cv.rect(x - w / 2, y - h, x + w / 2, y, k)
        cv.mark(x - 0.45 * w, y - 0.8 * h, x + 0.45 * w, y - 0.45 * h, DETAIL_WINDOW, where=k)
    cv.mark(x - 0.45 * w, y - 0.12 * h, x - 0.2 * w, y, DETAIL_DARK, where=k)  # tyres
    cv.mark(x + 0.2 * w, y - 0.12 * h, x + 0.45 * w, y, DETAIL_DARK, where=k)


def _figure(cv: Canvas, x: float, y: float, h: float, cls: int, rng: np.random.Generator) -> None:
    """A standing or seated person: legs, torso, head; the head carries a skin-coloured mark."""
    k = cv.new(cls, rng)
    w = 0.32 * h
    cv.rect(x - w / 2, y - 0.8 * h, x + w / 2, y - 0.35 * h, k)
    cv.rect(x - 0.4 * w, y - 0.35 * h, x + 0.4 * w, y, k)
    cv.ellipse(x, y - 0.88 * h, 0.14 * h, 0.12 * h, k)
    cv.mark(x - 0.15 * h, y - h, x + 0.15 * h, y - 0.78 * h, DETAIL_SKIN, where=k)


def _person(cv: Canvas, st: Street, s: float, rng: np.random.Generator) -> None:
    side = -1 if rng.random() < 0.5 else 1
    y = st.ground_row(s)
    x = st.vx + side * (st.half_road + st.sidewalk * rng.uniform(0.1, 0.9)) * s
    _figure(cv, x, y, PERSON_HEIGHT * st.half_road * s * rng.uniform(0.85, 1.15), PERSON, rng)


def _rider(cv: Canvas, st: Street, s: float, rng: np.random.Generator) -> None:
    y = st.ground_row(s)
    x = st.vx + rng.uniform(0.6, 0.95) * (-1 if rng.random() < 0.5 else 1) * st.road_half(y)
    h = PERSON_HEIGHT * st.half_road * s
    cls = BICYCLE if rng.random() < 0.7 else MOTORCYCLE
    k = cv.new(cls, rng)
    r = 0.2 * h
    for dx in (-0.3 * h, 0.3 * h):  # wheels
        cv.ellipse(x + dx, y - r, r, r, k)
    if cls == MOTORCYCLE:
        cv.rect(x - 0.3 * h, y - 0.45 * h, x + 0.3 * h, y - 0.15 * h, k)
    else:
        cv.rect(x - 0.3 * h, y - 0.3 * h, x + 0.3 * h, y - 0.22 * h, k)  # frame
    _figure(cv, x, y - 0.3 * h, 0.8 * h, RIDER, rng)


def draw_scene(rng: np.random.Generator, h: int, w: int, lay: Layout) -> Canvas:
    """Paint one street scene back to front into label/instance/detail maps."""
    cv = Canvas(h, w)
    horizon = rng.uniform(*lay.horizon) * h
    st = Street(
        h=h, w=w, horizon=horizon, vx=w * rng.uniform(0.35, 0.65),
        half_road=w * rng.uniform(0.45, 0.75), sidewalk=w * rng.uniform(0.15, 0.35),
    )  # fmt: skip
    _skyline(cv, st, rng)
    # background tree line in front of the buildings
    if rng.random() < 0.5:
        k = cv.new(VEGETATION, rng)
        x0 = rng.uniform(0, w)
        for x in np.arange(x0, x0 + rng.uniform(0.2, 0.5) * w, 3):
            r = rng.uniform(2, 5)
            cv.ellipse(x, horizon - r * 0.5, r, r, k)
    _ground(cv, st, lay, rng)
    if rng.random() < lay.p_wall:
        _side_strip(cv, st, WALL, rng.uniform(0.15, 0.35), rng)
    if rng.random() < lay.p_fence:
        _side_strip(cv, st, FENCE, rng.uniform(0.12, 0.25), rng)

    # standing objects, sorted far to near so that near ones occlude
    objects: list[tuple[float, int]] = []
    for kind, mean in enumerate((lay.n_vehicles, lay.n_trees, lay.n_poles, lay.n_persons, lay.n_riders)):
        for _ in range(int(rng.poisson(mean))):
            s = DEPTH_MIN + (DEPTH_MAX - DEPTH_MIN) * rng.random() ** lay.depth_power
            objects.append((s, kind))
    for s, kind in sorted(objects):
        if kind == 0:
            _vehicle(cv, st, s, lay, rng)
        elif kind == 1:
            _tree(cv, st, s, rng)
        elif kind == 2:
            _pole(cv, st, s, rng)
        elif kind == 3:
            _person(cv, st, s, rng)
        else:
            _rider(cv, st, s, rng)

    if lay.hood > 0:  # ego-vehicle hood: ignore
        hood = int(round(lay.hood * rng.uniform(0.5, 1.0) * h))
        if hood > 0:
            cv2.ellipse(cv.label, (w // 2, h + hood), (int(0.7 * w), 2 * hood), 0, 180, 360, IGNORE_INDEX, -1)
            cv.detail[cv.label == IGNORE_INDEX] = DETAIL_DARK
    return cv


# ---------------------------------------------------------------- rendering


def _detail_colours(img: np.ndarray, detail: np.ndarray, real: float) -> None:
    """Apply appearance marks in place; `real` in [0, 1] moves them to the target's look."""
    m = detail == DETAIL_WINDOW
    img[m] = img[m] * (0.45 - 0.15 * real) + np.array([20, 30, 60], np.float32) * (1 - real)
    m = detail == DETAIL_DARK
    img[m] = img[m] * 0.35
    img[detail == DETAIL_LAMP] = (230, 40, 30)
    m = detail == DETAIL_SKIN
    img[m] = np.array([225, 180, 140], np.float32) * (1 - 0.3 * real)
    m = detail == DETAIL_MARKING
    img[m] = img[m] + (1 - 0.5 * real) * (235 - img[m])


def render_source(cv: Canvas, rng: np.random.Generator) -> np.ndarray:
    """Flat palette colours, small uniform noise, crisp edges -> [H, W, 3] uint8 RGB."""
    colours = np.asarray(cv.colours, np.float32)
    img = colours[cv.inst]
    _detail_colours(img, cv.detail, 0.0)
    img += rng.uniform(-SOURCE_NOISE, SOURCE_NOISE, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: random values on a coarse grid, upsampled."""
    small = rng.uniform(-1, 1, (max(2, h // cell), max(2, w // cell))).astype(np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass(frozen=True)
class TargetLook:
    """Amplitudes of the target's look at shift = 1 (each is multiplied by shift). Ranges are uniform draws.

    Calibrated at shift 0.6 on a source-only DeepLab-v2 (ResNet-18 at width 0.25, GroupNorm, Adam, 1000 steps of
    8 images): class colours cost it ~14 mIoU on the target, exposure gain and side shading ~7, blur, gamma and
    noise ~1 each, textures < 1. These values leave source-only at ~0.65 of the oracle, as in the prototype.
    """

    colour_shift: float = 0.85  # share of the way from SOURCE_COLOURS to TARGET_COLOURS
    keep_own_colour: float = 0.5  # instance-coloured classes (cars, clothes) keep this share of their own colour
    instance_gain: float = 0.12  # +- brightness jitter per instance
    sky_gradient: tuple[float, float, float] = (50.0, 30.0, 10.0)  # added at the bottom of the sky, RGB
    road_grain: float = 10.0  # std of per-pixel grey noise on the road
    checker: float = 14.0  # +- sidewalk paving pattern
    stripes: float = 16.0  # +- horizontal facade stripes
    foliage_blobs: float = 35.0  # low-frequency noise on vegetation and terrain
    foliage_grain: float = 12.0  # per-pixel noise on vegetation and terrain
    gain: tuple[float, float] = (-0.15, 0.15)  # per-image exposure change
    cast: float = 0.12  # +- per-channel colour cast
    shading: tuple[float, float] = (0.05, 0.25)  # darkening toward one side
    gamma: tuple[float, float] = (-0.3, 0.4)  # gamma = 1 + shift * draw
    blur: tuple[float, float] = (0.3, 1.0)  # Gaussian sigma, pixels
    noise: float = 6.0  # std of sensor noise, grey levels


TARGET_LOOK = TargetLook()


def render_target(cv: Canvas, rng: np.random.Generator, shift: float, look: TargetLook = TARGET_LOOK) -> np.ndarray:
    """The "real" look: class colours moved toward TARGET_COLOURS, textures and camera effects, all x shift."""
    h, w = cv.label.shape
    classes = np.asarray(cv.classes)
    src = np.asarray(cv.colours, np.float32)
    # instances keep part of their own variation (e.g. car colours), moved toward the target colour of their class
    base = np.asarray([SOURCE_COLOURS[c] for c in classes], np.float32)
    dst = base + look.colour_shift * (np.asarray([TARGET_COLOURS[c] for c in classes], np.float32) - base)
    own = np.where(np.isin(classes, list(INSTANCE_COLOURS))[:, None], look.keep_own_colour, 0.0)
    colours = src + shift * ((1 - own) * (dst - base) + own * (dst - src))
    colours *= 1 + shift * rng.uniform(-look.instance_gain, look.instance_gain, (len(colours), 1)).astype(np.float32)
    img = colours[cv.inst].astype(np.float32)
    lab = cv.label
    yy, xx = np.mgrid[0:h, 0:w]

    # textures
    sky = lab == SKY
    grad = (yy / float(h))[..., None] * np.asarray(look.sky_gradient, np.float32)  # brighter toward the horizon
    img[sky] += shift * grad[sky]
    road = lab == ROAD
    img[road] += shift * rng.normal(0, look.road_grain, (int(road.sum()), 1)).astype(np.float32)
    walk = lab == SIDEWALK
    checker = (((xx // 3) + (yy // 2)) % 2 * 2 - 1).astype(np.float32)
    img[walk] += shift * look.checker * checker[walk][:, None]
    bld = lab == BUILDING
    stripes = ((yy // 2) % 2 * 2 - 1).astype(np.float32)
    img[bld] += shift * look.stripes * stripes[bld][:, None]
    veg = (lab == VEGETATION) | (lab == TERRAIN)
    blobs = _smooth_noise(rng, h, w, 3) * look.foliage_blobs
    blobs += rng.normal(0, look.foliage_grain, (h, w)).astype(np.float32)
    img[veg] += shift * blobs[veg][:, None] * np.array([0.8, 1.0, 0.6], np.float32)
    _detail_colours(img, cv.detail, shift)

    # camera: gain, colour cast, side shading, gamma, blur, sensor noise
    img *= 1 + shift * rng.uniform(*look.gain)
    img *= 1 + shift * rng.uniform(-look.cast, look.cast, 3).astype(np.float32)
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    if rng.random() < 0.5:
        ramp = ramp[:, ::-1]
    img *= 1 - shift * rng.uniform(*look.shading) * ramp
    img = np.clip(img, 0, 255)
    img = 255 * (img / 255) ** (1 + shift * rng.uniform(*look.gamma))
    sigma = shift * rng.uniform(*look.blur)
    if sigma > MIN_BLUR_SIGMA:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    img += shift * rng.normal(0, look.noise, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


MIN_BLUR_SIGMA = 0.05  # below this a Gaussian blur changes nothing visible: skip it


def image_rng(seed: int, domain: str, split: str, index: int) -> np.random.Generator:
    """The random generator of one image: a function of (seed, domain, split, index) only."""
    return np.random.default_rng([seed, DOMAIN_CODES[domain], SPLIT_CODES[split], index])


def render_pair_image(
    cfg: EmbeddedConfig, domain: str, split: str, index: int
) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image uint8, train-id label uint8 with 255 = ignore) of one image of the pair."""
    rng = image_rng(cfg.seed, domain, split, index)
    cv = draw_scene(rng, cfg.height, cfg.width, layout_for(domain, cfg.shift))
    image = render_source(cv, rng) if domain == "source" else render_target(cv, rng, cfg.shift)
    return image, cv.label


# ---------------------------------------------------------------- writing the GTA5 / Cityscapes layouts


@dataclass(frozen=True)
class Job:
    domain: str
    split: str
    index: int
    image_path: str
    label_path: str


def _label_ids(label: np.ndarray) -> np.ndarray:
    """Train ids -> Cityscapes label ids as stored on disk (ignore -> ego vehicle)."""
    lut = np.full(256, EGO_VEHICLE_ID, np.uint8)
    lut[:NUM_CLASSES] = TRAINID_TO_ID
    return lut[label]


def _write_png(path: str, array: np.ndarray) -> None:
    write_image(path, array)  # cv2.imwrite's bytes, for any file name (imwrite crashes on non-UTF-8 ones)


def _run_job(cfg: EmbeddedConfig, job: Job) -> np.ndarray:
    image, label = render_pair_image(cfg, job.domain, job.split, job.index)
    _write_png(job.image_path, np.ascontiguousarray(image[..., ::-1]))
    _write_png(job.label_path, _label_ids(label))
    return np.bincount(label.ravel(), minlength=256)[:NUM_CLASSES]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would only compete


def _run_chunk(cfg: EmbeddedConfig, jobs: list[Job]) -> list[np.ndarray]:
    return [_run_job(cfg, job) for job in jobs]


def city_names(split: str, n: int) -> list[str]:
    """Cities of a split: different for train and val, as in Cityscapes (no '_' in a city name)."""
    return [f"{split}city{k}" for k in range(n)]


def plan_jobs(cfg: EmbeddedConfig, tmp: Path) -> tuple[list[Job], dict[str, list[str]]]:
    """Every image to write under `tmp`, and the source split lists."""
    jobs: list[Job] = []
    src = tmp / "source"
    splits: dict[str, list[str]] = {"train": [], "val": []}
    number = 1  # GTA5 numbers its images from 00001
    for split, n in (("train", cfg.n_source_train), ("val", cfg.n_source_val)):
        for i in range(n):
            name = f"{number:05d}"
            splits[split].append(name)
            paths = str(src / "images" / f"{name}.png"), str(src / "labels" / f"{name}.png")
            jobs.append(Job("source", split, i, *paths))
            number += 1
    tgt = tmp / "target"
    for split, n in (("train", cfg.n_target_train), ("val", cfg.n_target_val)):
        cities = city_names(split, cfg.n_cities)
        for i in range(n):
            city, seq = cities[i % len(cities)], i // len(cities)
            stem = f"{city}_{seq:06d}_{CITYSCAPES_FRAME:06d}"
            jobs.append(
                Job(
                    "target", split, i,
                    str(tgt / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png"),
                    str(tgt / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"),
                )
            )  # fmt: skip
    return jobs, splits


def _chunks(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    for i in range(0, len(jobs), size):
        yield jobs[i : i + size]


CHUNK = 32  # images per worker task: large enough to amortise pickling, small enough for a smooth progress bar


def generate_pair(root: Path | str, cfg: EmbeddedConfig, progress: bool = True) -> dict:
    """Write the pair under `root` (source/ in the GTA5 layout, target/ in the Cityscapes layout) and
    root/summary.json; return the summary. Written into a temporary sibling folder and renamed into place,
    so an interrupted run never leaves a half dataset; an existing `root` is replaced only on success."""
    from tqdm import tqdm

    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        jobs, splits = plan_jobs(cfg, tmp)
        for folder in sorted({str(Path(p).parent) for j in jobs for p in (j.image_path, j.label_path)}):
            Path(folder).mkdir(parents=True, exist_ok=True)
        (tmp / "source" / "split").mkdir(parents=True)
        for split, names in splits.items():
            (tmp / "source" / "split" / f"{split}.txt").write_text("".join(f"{n}\n" for n in names))

        counts = {d: {s: np.zeros(NUM_CLASSES, np.int64) for s in SPLIT_CODES} for d in DOMAIN_CODES}
        bar = tqdm(total=len(jobs), desc="embedded pair", unit="img", disable=not progress)
        chunks = list(_chunks(jobs, CHUNK))
        if cfg.workers == 1:
            results = (_run_chunk(cfg, c) for c in chunks)
            pool = None
        else:
            # spawn, not fork: the caller may hold threads (torch, tqdm) that a forked child would inherit locked
            ctx = multiprocessing.get_context("spawn")
            pool = ProcessPoolExecutor(max_workers=cfg.workers, mp_context=ctx, initializer=_init_worker)
            results = pool.map(_run_chunk, [cfg] * len(chunks), chunks)
        try:
            for chunk, hist in zip(chunks, results, strict=True):
                for job, h in zip(chunk, hist, strict=True):
                    counts[job.domain][job.split] += h
                bar.update(len(chunk))
        finally:
            bar.close()
            if pool is not None:
                pool.shutdown(cancel_futures=True)

        summary = _summary(cfg, counts)
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if root.exists():
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.replace(root, old)
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _summary(cfg: EmbeddedConfig, counts: dict[str, dict[str, np.ndarray]]) -> dict:
    # `workers` changes nothing in the data, so it stays out: the summary is the same for any worker count
    config = {k: v for k, v in asdict(cfg).items() if k != "workers"}
    out: dict = {"config": config, "classes_drawn": [CLASS_NAMES[c] for c in DRAWN_CLASSES], "domains": {}}
    for domain, per_split in counts.items():
        n = {
            "source": {"train": cfg.n_source_train, "val": cfg.n_source_val},
            "target": {"train": cfg.n_target_train, "val": cfg.n_target_val},
        }[domain]
        entry = {"images": n, "class_pixel_fraction": {}}
        for split, c in per_split.items():
            total = max(int(c.sum()), 1)
            fractions = {CLASS_NAMES[i]: round(int(c[i]) / total, 6) for i in range(NUM_CLASSES)}
            entry["class_pixel_fraction"][split] = fractions
        out["domains"][domain] = entry
    return out
