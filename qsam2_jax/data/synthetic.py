"""Synthetic segmentation datasets: COCO-style images and DAVIS-style videos of textured shapes.

They let every pipeline (QAT, mIoU and J&F evaluation) run end to end without downloading a
dataset. Shapes (ellipses, star-shaped polygons, rectangles) carry their own textures (stripes,
checkers, rings, blotches) on a textured background plus sensor noise, so a mask is not a colour
threshold away. Ground truth is the visible part of each shape: later shapes occlude earlier ones.
Style "varied" (opt-in; the default "basic" is unchanged) adds non-convex, thin, holed and
multi-part shapes, more occluders and unlabelled look-alikes in the background, so that a mask
is far from its box: at 128² the floors (mask = box, mask = ellipse inscribed in the box) are
0.49 / 0.52 there against 0.66 / 0.71 for basic (64 images of seed 1).

Layouts:
  images: `<out>/images/000001.jpg ...` and `<out>/annotations.json` (COCO; `file_name` is
    relative to `<out>`, e.g. "images/000001.jpg", so the image root is the dataset directory;
    `segmentation` is compressed RLE with `counts` as str).
  video: `<out>/JPEGImages/<video>/00000.jpg ...` and `<out>/Annotations/<video>/00000.png ...`
    (palette PNGs, 0 = background, object ids 1..K, DAVIS palette), and `<out>/meta.json`.

Everything is a pure function of (seed, index): item i does not depend on how many items are
generated, and two runs write byte-identical files (with the same numpy / Pillow builds).
Datasets are written into a temporary directory next to the target and renamed into place, so
an interrupted run never leaves a half-written dataset under the target name.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from qsam2_jax.data import rle

SHAPES = ("ellipse", "polygon", "rectangle")
# Shapes a box or an inscribed ellipse fits badly (style "varied"): non-convex, thin, holed,
# unions of parts.
VARIED_SHAPES = ("star", "cross", "ring", "lshape", "bar", "crescent", "dumbbell")
ALL_SHAPES = SHAPES + VARIED_SHAPES
CATEGORIES = tuple({"id": i + 1, "name": name, "supercategory": "shape"}
                   for i, name in enumerate(SHAPES))
TEXTURES = ("flat", "stripes", "checker", "rings", "blotches")
MIN_SIZE = 16  # smallest image side we generate (shapes need a few pixels)
JPEG_QUALITY = 90
# basic: convex-ish shapes on smooth backgrounds (the original generator; a box fills ~0.66 of
# a mask at 128²). varied: adds VARIED_SHAPES, more occluders and unlabelled object-like
# clutter in the background, so the mask = box / ellipse floors are low (see `synth_image`).
STYLES = ("basic", "varied")
# Kind weights of the varied style (ALL_SHAPES order): few convex shapes.
_VARIED_WEIGHTS = np.array([0.05, 0.07, 0.04, 0.14, 0.13, 0.12, 0.12, 0.11, 0.11, 0.11])
# Random streams: image i and video i of one seed are independent, and a varied item shares no
# draws with the basic item of the same (seed, index).
_IMAGE_STREAM, _VIDEO_STREAM = 0, 1
_VARIED_IMAGE_STREAM, _VARIED_VIDEO_STREAM = 2, 3
MIN_CONTRAST = 24.0  # varied: a shape whose visible mean colour is this close to its
#                      surroundings' (RGB distance, before noise) gets no annotation


def categories(style: str = "basic") -> tuple[dict, ...]:
  """The COCO categories of a style's datasets (ids of the basic shapes are the same in both)."""
  names = SHAPES if _check_style(style) == "basic" else ALL_SHAPES
  return tuple({"id": i + 1, "name": name, "supercategory": "shape"}
               for i, name in enumerate(names))


def _check_style(style: str) -> str:
  if style not in STYLES:
    raise ValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
  return style

Progress = Callable[[int], object]


# ------------------------------------------------------------------------------------ shapes


@dataclass(frozen=True)
class _Texture:
  kind: str
  colours: np.ndarray  # (2, 3) float: texture value 0 -> colours[0], 1 -> colours[1]
  freq: float
  angle: float
  phase: float
  grid: np.ndarray  # (g, g) value-noise lattice for "blotches"
  shade: np.ndarray  # (2,) linear shading gradient in local units


@dataclass(frozen=True)
class _Shape:
  """A shape in its local frame: centred at the origin, half-extents `radius`, `radius*aspect`."""
  kind: str
  radius: float
  aspect: float
  texture: _Texture
  poly_xy: np.ndarray | None = None  # (n, 2) vertices (x, y) in pixels, by increasing angle
  poly_angles: np.ndarray | None = None  # (n,) their polar angles in [0, 2 pi)
  params: tuple[float, ...] = ()  # the varied kinds' proportions (see `_inside`)

  @property
  def extent(self) -> float:
    """Largest distance of a shape pixel from its centre at scale 1 (bounds its footprint)."""
    if self.kind in ("ellipse", "polygon", "star"):
      return self.radius
    # Every other kind lies inside the rectangle [-a, a] x [-b, b].
    return self.radius * math.sqrt(1.0 + self.aspect**2)


def _random_colour_pair(rng: np.random.Generator) -> np.ndarray:
  """Two colours far enough apart that the texture is visible."""
  c0 = rng.uniform(0, 255, 3)
  direction = rng.normal(size=3)
  direction /= np.linalg.norm(direction) + 1e-9
  c1 = np.clip(c0 + direction * rng.uniform(60, 140), 0, 255)
  return np.stack([c0, c1])


def _random_texture(rng: np.random.Generator) -> _Texture:
  return _Texture(
      kind=TEXTURES[rng.integers(len(TEXTURES))],
      colours=_random_colour_pair(rng),
      freq=float(rng.uniform(1.0, 4.0)),
      angle=float(rng.uniform(0, math.pi)),
      phase=float(rng.uniform(0, 2 * math.pi)),
      grid=rng.uniform(0, 1, (6, 6)),
      shade=rng.uniform(-0.15, 0.15, 2),
  )


def _random_shape(rng: np.random.Generator, radius: float, style: str = "basic",
                  kind: str | None = None) -> _Shape:
  """A random shape of `style`; `kind` fixes a basic kind instead of drawing it."""
  if style == "varied":
    return _random_varied_shape(rng, radius)
  if kind is None:
    kind = SHAPES[rng.integers(len(SHAPES))]
  aspect = float(rng.uniform(0.45, 1.0))
  xy = angles = None
  if kind == "polygon":
    n = int(rng.integers(3, 9))
    # Jittered regular angles keep every gap < pi, so the polygon is star-shaped about the origin;
    # stretching by the half-extents keeps that (a linear map preserves half-planes).
    a = 2 * math.pi * (np.arange(n) + rng.uniform(-0.2, 0.2, n)) / n + rng.uniform(0, 2 * math.pi)
    rho = rng.uniform(0.55, 1.0, n)
    xy = np.stack([radius * rho * np.cos(a), radius * aspect * rho * np.sin(a)], axis=1)
    angles = np.arctan2(xy[:, 1], xy[:, 0]) % (2 * math.pi)
    order = np.argsort(angles)
    xy, angles = xy[order], angles[order]
  return _Shape(kind, float(radius), aspect, _random_texture(rng), xy, angles)


def _random_varied_shape(rng: np.random.Generator, radius: float) -> _Shape:
  """A shape of the varied style. Thin parts are at least ~3 px wide at scale 1, so no shape
  vanishes into a line of pixels."""
  kind = ALL_SHAPES[rng.choice(len(ALL_SHAPES), p=_VARIED_WEIGHTS)]
  if kind in SHAPES:
    return _random_shape(rng, radius, kind=kind)
  aspect = float(rng.uniform(0.5, 1.0))
  thin = 1.5 / radius  # half-width of 1.5 px, in units of the radius
  xy = angles = None
  params: tuple[float, ...] = ()
  if kind == "star":
    n = int(rng.integers(4, 8))
    inner = rng.uniform(0.3, 0.55)
    jitter = rng.uniform(-0.15, 0.15, 2 * n)   # < half a step: gaps stay < pi (star-shaped)
    a = math.pi * (np.arange(2 * n) + jitter) / n + rng.uniform(0, 2 * math.pi)
    rho = np.where(np.arange(2 * n) % 2 == 0, rng.uniform(0.85, 1.0, 2 * n),
                   inner * rng.uniform(0.85, 1.15, 2 * n))
    xy = np.stack([radius * rho * np.cos(a), radius * aspect * rho * np.sin(a)], axis=1)
    angles = np.arctan2(xy[:, 1], xy[:, 0]) % (2 * math.pi)
    order = np.argsort(angles)
    xy, angles = xy[order], angles[order]
  elif kind == "cross":   # arm half-width (of the shorter side), where the arms cross
    params = (max(rng.uniform(0.18, 0.35), thin / aspect), rng.uniform(-0.5, 0.5),
              rng.uniform(-0.5, 0.5))
  elif kind == "ring":    # inner radius as a share of the outer one
    params = (max(0.0, min(rng.uniform(0.45, 0.72), 1.0 - 2 * thin / aspect)),)
  elif kind == "lshape":  # the removed corner starts at these shares of the half-extents
    params = (rng.uniform(-0.6, 0.2), rng.uniform(-0.6, 0.2))
  elif kind == "bar":
    aspect = max(float(rng.uniform(0.1, 0.25)), thin)
  elif kind == "crescent":  # offset and size of the ellipse cut out of the ellipse
    params = (rng.uniform(0.35, 0.75), rng.uniform(0.8, 1.0))
  else:                   # dumbbell: end-disc radius (share of the half-length), bar half-width
    params = (rng.uniform(0.3, 0.45), max(rng.uniform(0.1, 0.2), thin / aspect))
  return _Shape(kind, float(radius), aspect, _random_texture(rng), xy, angles,
                tuple(float(p) for p in params))


def _inside(shape: _Shape, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Membership of local coordinates (u, v) (pixels at scale 1)."""
  a, b = shape.radius, shape.radius * shape.aspect
  if shape.kind == "ellipse":
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0
  if shape.kind in ("rectangle", "bar"):
    return (np.abs(u) <= a) & (np.abs(v) <= b)
  if shape.kind == "cross":
    w, cu, cv = shape.params
    hw = w * b
    return (((np.abs(u) <= a) & (np.abs(v - cv * b) <= hw))
            | ((np.abs(u - cu * a) <= hw) & (np.abs(v) <= b)))
  if shape.kind == "ring":
    r2 = (u / a) ** 2 + (v / b) ** 2
    return (r2 <= 1.0) & (r2 > shape.params[0] ** 2)
  if shape.kind == "lshape":
    pu, pv = shape.params
    return (np.abs(u) <= a) & (np.abs(v) <= b) & ((u <= pu * a) | (v <= pv * b))
  if shape.kind == "crescent":
    d, r = shape.params
    outer = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return outer & (((u - d * a) / (r * a)) ** 2 + (v / (r * b)) ** 2 > 1.0)
  if shape.kind == "dumbbell":
    r, hw = shape.params
    ends = [((u - s * (1 - r) * a) / (r * a)) ** 2 + (v / min(b, 1.6 * r * a)) ** 2 <= 1.0
            for s in (-1.0, 1.0)]
    return ends[0] | ends[1] | ((np.abs(u) <= a) & (np.abs(v) <= hw * b))
  # Star-shaped polygon: inside iff the point is no farther than the edge along its own ray.
  px, py = shape.poly_xy[:, 0], shape.poly_xy[:, 1]
  n = px.size
  phi = np.arctan2(v, u) % (2 * math.pi)
  i = np.searchsorted(shape.poly_angles, phi, side="right") - 1  # -1 wraps to the last edge
  j = (i + 1) % n
  ex, ey = px[j] - px[i], py[j] - py[i]
  # The ray t·(cos phi, sin phi) meets the edge P_i + s·E at t = (P_i × E) / (d × E).
  num = px[i] * ey - py[i] * ex
  den = np.cos(phi) * ey - np.sin(phi) * ex
  t_edge = np.where(den > 1e-12, num / np.maximum(den, 1e-12), 0.0)
  return np.hypot(u, v) <= t_edge


def _texture_values(tex: _Texture, s: np.ndarray, t: np.ndarray) -> np.ndarray:
  """Texture in [0, 1] at unit-radius local coordinates (moves and turns with the shape)."""
  if tex.kind == "flat":
    return np.zeros_like(s)
  if tex.kind == "stripes":
    w = s * math.cos(tex.angle) + t * math.sin(tex.angle)
    return 0.5 + 0.5 * np.sin(2 * math.pi * tex.freq * w + tex.phase)
  if tex.kind == "checker":
    return ((np.floor(tex.freq * s) + np.floor(tex.freq * t)) % 2).astype(np.float64)
  if tex.kind == "rings":
    return 0.5 + 0.5 * np.sin(2 * math.pi * tex.freq * np.hypot(s, t) + tex.phase)
  g = tex.grid.shape[0] - 1  # blotches: bilinear value noise over [-1.5, 1.5]²
  coords = np.stack([(s + 1.5) / 3.0 * g, (t + 1.5) / 3.0 * g])
  return ndimage.map_coordinates(tex.grid, coords, order=1, mode="nearest")


def _render_shape(shape: _Shape, pose: Sequence[float], height: int, width: int
                  ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
  """Rasterises a shape at pose (cy, cx, theta, scale) on pixel centres (y, x).

  Returns (crop slices, (h, w) bool mask, (h, w, 3) float colours), or None when the shape's
  bounding disk misses the image. Only the bounding box is evaluated.
  """
  cy, cx, theta, scale = pose
  ext = shape.extent * scale + 2.0
  y0, y1 = max(0, math.floor(cy - ext)), min(height, math.ceil(cy + ext) + 1)
  x0, x1 = max(0, math.floor(cx - ext)), min(width, math.ceil(cx + ext) + 1)
  if y0 >= y1 or x0 >= x1:
    return None
  dy = np.arange(y0, y1, dtype=np.float64)[:, None] - cy
  dx = np.arange(x0, x1, dtype=np.float64)[None, :] - cx
  c, s = math.cos(theta), math.sin(theta)
  u = (c * dx + s * dy) / scale
  v = (-s * dx + c * dy) / scale
  mask = _inside(shape, u, v)
  tex = shape.texture
  su, sv = u / shape.radius, v / shape.radius
  value = _texture_values(tex, su, sv)
  colour = tex.colours[0] + (tex.colours[1] - tex.colours[0]) * value[..., None]
  colour = colour * (1.0 + tex.shade[0] * su + tex.shade[1] * sv)[..., None]
  return (slice(y0, y1), slice(x0, x1)), mask, colour


def _paint(rng: np.random.Generator, shape: _Shape, canvas: np.ndarray, labels: np.ndarray,
           k: int) -> None:
  """Places `shape` at a random pose and paints it (colour and label k) over what is there."""
  h, w = labels.shape
  pose = (rng.uniform(0, h - 1), rng.uniform(0, w - 1), rng.uniform(0, 2 * math.pi), 1.0)
  drawn = _render_shape(shape, pose, h, w)
  if drawn is not None:
    crop, mask, colour = drawn
    canvas[crop][mask] = colour[mask]
    labels[crop][mask] = k


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """Low-frequency two-colour value noise, a brightness gradient and faint stripes."""
  colours = _random_colour_pair(rng)
  g = int(rng.integers(3, 7))
  grid = rng.uniform(0, 1, (g + 1, g + 1))
  ys = np.linspace(0, g, height)[:, None] * np.ones((1, width))
  xs = np.linspace(0, g, width)[None, :] * np.ones((height, 1))
  noise = ndimage.map_coordinates(grid, np.stack([ys, xs]), order=3, mode="nearest")
  noise = np.clip(noise, 0, 1)
  img = colours[0] + (colours[1] - colours[0]) * noise[..., None]
  gy, gx = rng.uniform(-0.25, 0.25, 2)
  yy = np.linspace(-1, 1, height)[:, None]
  xx = np.linspace(-1, 1, width)[None, :]
  img = img * (1.0 + gy * yy + gx * xx)[..., None]
  angle, freq = rng.uniform(0, math.pi), rng.uniform(3, 12)
  stripes = np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
  return img + rng.uniform(0, 12) * stripes[..., None]


def _finish(canvas: np.ndarray, rng: np.random.Generator, sigma: float) -> np.ndarray:
  """Adds sensor noise and quantises to uint8 RGB."""
  noisy = canvas + rng.normal(0.0, sigma, canvas.shape)
  return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _check_size(size: Sequence[int]) -> tuple[int, int]:
  if len(size) != 2:
    raise ValueError(f"size must be (height, width), got {tuple(size)}")
  h, w = (int(s) for s in size)
  if h != size[0] or w != size[1] or min(h, w) < MIN_SIZE:
    raise ValueError(f"size must be two integers >= {MIN_SIZE}, got {tuple(size)}")
  return h, w


def _check_count(value: int, name: str, minimum: int = 1) -> int:
  if int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
  return int(value)


# -------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class SyntheticImage:
  """One generated image.

  image: (H, W, 3) uint8 RGB (before JPEG compression). labels: (H, W) int32, 0 = background,
  k = the k-th shape drawn (its visible pixels). categories: category id of each shape, 1-based
  in `categories(style)`. hidden: ids k of shapes that get no annotation because they blend
  into their surroundings (style "varied"; see `MIN_CONTRAST`).
  """
  image: np.ndarray
  labels: np.ndarray
  categories: tuple[int, ...]
  hidden: tuple[int, ...] = ()


def default_min_area(size: Sequence[int]) -> int:
  """Smallest visible area (pixels) a shape needs for an annotation: max(16, 0.05 % of H·W)."""
  h, w = size
  return max(16, round(0.0005 * h * w))


def synth_image(seed: int, index: int, size: Sequence[int] = (256, 256),
                style: str = "basic") -> SyntheticImage:
  """Image `index` of the dataset with this seed and style; at least one shape is annotatable
  (visible over `default_min_area(size)` pixels, not hidden), so every image has an annotation.

  basic: 3-7 textured shapes (ellipses, star-shaped polygons, rectangles), sizes spanning the
  COCO small / medium / large buckets at 256². varied: 4-9 shapes, most of them non-convex,
  thin, holed or made of parts (`VARIED_SHAPES`), painted over 2-5 unlabelled shapes of the
  same kinds and textures in the background, so neither the prompt box nor the ellipse inscribed
  in it is a good mask, and texture alone does not say what is an object.
  """
  h, w = _check_size(size)
  seed = _check_count(seed, "seed", 0)
  if _check_style(style) == "varied":
    return _synth_varied_image(seed, index, h, w)
  rng = np.random.default_rng([seed, _IMAGE_STREAM, index])
  while True:  # redraws are rare (every shape tiny or off-image) and deterministic
    canvas = _background(rng, h, w)
    labels = np.zeros((h, w), np.int32)
    cats = []
    for k in range(1, int(rng.integers(3, 8)) + 1):
      radius = min(h, w) * math.exp(rng.uniform(math.log(0.05), math.log(0.32)))
      shape = _random_shape(rng, radius)
      _paint(rng, shape, canvas, labels, k)
      cats.append(SHAPES.index(shape.kind) + 1)
    if np.bincount(labels.ravel())[1:].max(initial=0) >= default_min_area((h, w)):
      return SyntheticImage(_finish(canvas, rng, rng.uniform(2, 8)), labels, tuple(cats))


def _paint_clutter(rng: np.random.Generator, canvas: np.ndarray, count: int,
                   radii: tuple[float, float]) -> None:
  """Paints `count` unlabelled varied shapes into `canvas` (background that looks like objects);
  radii are shares of the shorter side, log-uniform."""
  h, w = canvas.shape[:2]
  for _ in range(count):
    radius = min(h, w) * math.exp(rng.uniform(math.log(radii[0]), math.log(radii[1])))
    shape = _random_shape(rng, radius, "varied")
    pose = (rng.uniform(0, h - 1), rng.uniform(0, w - 1), rng.uniform(0, 2 * math.pi), 1.0)
    drawn = _render_shape(shape, pose, h, w)
    if drawn is not None:
      crop, mask, colour = drawn
      canvas[crop][mask] = colour[mask]


def contrast(canvas: np.ndarray, mask: np.ndarray, width: int = 2) -> float:
  """RGB distance between the mean colour of `mask` and that of the `width`-pixel band around
  it (inf when the mask is empty or has no surroundings)."""
  if not mask.any():
    return math.inf
  band = ndimage.binary_dilation(mask, iterations=width) & ~mask
  if not band.any():
    return math.inf
  return float(np.linalg.norm(canvas[mask].mean(0) - canvas[band].mean(0)))


def _synth_varied_image(seed: int, index: int, h: int, w: int) -> SyntheticImage:
  rng = np.random.default_rng([seed, _VARIED_IMAGE_STREAM, index])
  min_area = default_min_area((h, w))
  while True:  # redraws (nothing annotatable) are rare and deterministic
    canvas = _background(rng, h, w)
    _paint_clutter(rng, canvas, int(rng.integers(2, 6)), (0.05, 0.2))
    labels = np.zeros((h, w), np.int32)
    cats = []
    for k in range(1, int(rng.integers(4, 10)) + 1):
      radius = min(h, w) * math.exp(rng.uniform(math.log(0.07), math.log(0.34)))
      shape = _random_shape(rng, radius, "varied")
      _paint(rng, shape, canvas, labels, k)
      cats.append(ALL_SHAPES.index(shape.kind) + 1)
    areas = np.bincount(labels.ravel(), minlength=len(cats) + 1)
    hidden = tuple(k for k in range(1, len(cats) + 1)
                   if areas[k] and contrast(canvas, labels == k) < MIN_CONTRAST)
    if any(areas[k] >= min_area and k not in hidden for k in range(1, len(cats) + 1)):
      return SyntheticImage(_finish(canvas, rng, rng.uniform(2, 8)), labels, tuple(cats), hidden)


def image_annotations(sample: SyntheticImage, image_id: int, first_ann_id: int,
                      min_area: int) -> list[dict]:
  """COCO annotations of the shapes whose visible area is at least `min_area` pixels (hidden
  shapes excluded)."""
  anns = []
  for k, cat in enumerate(sample.categories, start=1):
    if k in sample.hidden:
      continue
    mask = sample.labels == k
    area = rle.area(mask)
    if area < min_area:
      continue
    anns.append({"id": first_ann_id + len(anns), "image_id": image_id, "category_id": cat,
                 "segmentation": rle.encode(mask), "area": float(area),
                 "bbox": rle.bbox_xywh(mask), "iscrowd": 0})
  return anns


# --------------------------------------------------------------------------------------- video


@dataclass(frozen=True)
class SyntheticVideo:
  """One generated video.

  frames: (T, H, W, 3) uint8 RGB. labels: (T, H, W) uint8, 0 = background, object ids 1..K
  (visible pixels; a higher id is drawn on top). full_masks: (K, T, H, W) bool, each object's
  whole footprint inside the frame before occlusion. wanderer: id of the object that leaves the
  frame mid-video and comes back (0 when T < 3).
  """
  frames: np.ndarray
  labels: np.ndarray
  full_masks: np.ndarray
  wanderer: int


def _exit_distance(p: np.ndarray, direction: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> float:
  """Distance along `direction` from p (inside [lo, hi]) to the box's boundary."""
  dists = []
  for axis in range(2):
    d = direction[axis]
    if d > 1e-9:
      dists.append((hi[axis] - p[axis]) / d)
    elif d < -1e-9:
      dists.append((lo[axis] - p[axis]) / d)
  return max(0.0, min(dists))


def _sample_video(rng: np.random.Generator, h: int, w: int, num_frames: int,
                  style: str = "basic") -> tuple[list[_Shape], np.ndarray, int]:
  """Objects and their poses (K, T, 4) = (cy, cx, theta, scale) per frame; one wanderer."""
  k = int(rng.integers(2, 5)) if style == "basic" else int(rng.integers(3, 6))
  dims = np.array([h, w], np.float64)
  t = np.arange(num_frames, dtype=np.float64)
  shapes, poses = [], []
  for _ in range(k):
    shape = _random_shape(rng, min(h, w) * rng.uniform(0.12, 0.24), style)
    c0 = rng.uniform(0.2, 0.8, 2) * dims
    amp = rng.uniform(0.05, 0.25, 2) * dims
    omega = rng.uniform(0.1, 0.35, 2)
    phase = rng.uniform(0, 2 * math.pi, 2)
    centre = c0 + amp * (np.sin(omega * t[:, None] + phase) - np.sin(phase))  # (T, 2), c(0) = c0
    theta = rng.uniform(0, 2 * math.pi) + rng.uniform(-0.08, 0.08) * t
    scale = 1.0 + 0.15 * np.sin(rng.uniform(0.05, 0.2) * t + rng.uniform(0, 2 * math.pi))
    shapes.append(shape)
    poses.append(np.concatenate([centre, theta[:, None], scale[:, None]], axis=1))
  poses = np.stack(poses)
  wanderer = 0
  if num_frames >= 3:
    # Excursion D·sin(pi·t/(T-1)) along a random direction: zero at both ends, and at the middle
    # frame large enough to carry the whole footprint out of the image.
    wanderer = int(rng.integers(1, k + 1))
    mid = (num_frames - 1) // 2
    angle = rng.uniform(0, 2 * math.pi)
    direction = np.array([math.sin(angle), math.cos(angle)])
    pose_mid = poses[wanderer - 1, mid]
    margin = shapes[wanderer - 1].extent * pose_mid[3] + 3.0
    out = _exit_distance(pose_mid[:2], direction, -margin * np.ones(2), dims - 1 + margin)
    bump = np.sin(math.pi * t / (num_frames - 1))
    poses[wanderer - 1, :, :2] += (out + 1.0) / bump[mid] * bump[:, None] * direction
  return shapes, poses, wanderer


def _render_video(rng: np.random.Generator, shapes: list[_Shape], poses: np.ndarray,
                  h: int, w: int, style: str = "basic"
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  k, num_frames = poses.shape[:2]
  background = _background(rng, h, w)
  if style == "varied":   # still, unlabelled look-alikes the objects move over
    _paint_clutter(rng, background, int(rng.integers(2, 5)), (0.06, 0.18))
  sigma = rng.uniform(2, 6)
  frames = np.zeros((num_frames, h, w, 3), np.uint8)
  labels = np.zeros((num_frames, h, w), np.uint8)
  full = np.zeros((k, num_frames, h, w), bool)
  for t in range(num_frames):
    canvas = background.copy()
    for obj, shape in enumerate(shapes):
      drawn = _render_shape(shape, poses[obj, t], h, w)
      if drawn is None:
        continue
      crop, mask, colour = drawn
      canvas[crop][mask] = colour[mask]
      labels[t][crop][mask] = obj + 1
      full[obj, t][crop] = mask
    frames[t] = _finish(canvas, rng, sigma)
  return frames, labels, full


def synth_video(seed: int, index: int, num_frames: int,
                size: Sequence[int] = (256, 256), style: str = "basic") -> SyntheticVideo:
  """Video `index` of the dataset with this seed and style: textured objects moving smoothly
  (basic: 2-4 of the basic shapes; varied: 3-5 of the varied style's shapes over still,
  unlabelled look-alikes in the background, see `synth_image`).

  Every object is visible in frame 0 (the semi-supervised prompt frame; varied: also with a
  colour contrast of at least `MIN_CONTRAST` there); objects occlude one another (higher ids on
  top) and may leave the frame partly; with T >= 3 frames one object (the wanderer) leaves the
  frame entirely around the middle frame and is back in the last one.
  """
  h, w = _check_size(size)
  num_frames = _check_count(num_frames, "num_frames")
  seed = _check_count(seed, "seed", 0)
  stream = _VIDEO_STREAM if _check_style(style) == "basic" else _VARIED_VIDEO_STREAM
  rng = np.random.default_rng([seed, stream, index])
  min_visible = max(9, round(0.004 * h * w))
  mid = (num_frames - 1) // 2
  for _ in range(200):
    shapes, poses, wanderer = _sample_video(rng, h, w, num_frames, style)
    frames, labels, full = _render_video(rng, shapes, poses, h, w, style)
    visible0 = [np.count_nonzero(labels[0] == i + 1) for i in range(len(shapes))]
    ok = min(visible0) >= min_visible
    if ok and style == "varied":
      f0 = frames[0].astype(np.float64)
      ok = all(contrast(f0, labels[0] == i + 1) >= MIN_CONTRAST for i in range(len(shapes)))
    if ok and wanderer:
      ok = (not full[wanderer - 1, mid].any()
            and np.count_nonzero(labels[-1] == wanderer) >= min_visible)
    if ok:
      return SyntheticVideo(frames, labels, full, wanderer)
  raise RuntimeError(f"could not place the objects of video {index} in {h}x{w} frames")


def davis_palette() -> list[int]:
  """The 256-colour DAVIS / PASCAL VOC palette (id 1 = dark red, 2 = green, ...), flat RGB."""
  palette = []
  for i in range(256):
    r = g = b = 0
    c = i
    for bit in range(7, -1, -1):
      r |= (c & 1) << bit
      g |= ((c >> 1) & 1) << bit
      b |= ((c >> 2) & 1) << bit
      c >>= 3
    palette += [r, g, b]
  return palette


def save_palette_png(labels: np.ndarray, path: str | os.PathLike) -> None:
  """Writes (H, W) uint8 object ids as a mode-"P" PNG with the DAVIS palette."""
  labels = np.ascontiguousarray(labels, dtype=np.uint8)
  img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
  img.putpalette(davis_palette())
  img.save(path, format="PNG")


# ----------------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_dir(out_dir: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
  """Yields a fresh directory next to `out_dir`, renamed to `out_dir` when the block succeeds."""
  out = Path(out_dir)
  if out.exists():
    if not out.is_dir():
      raise FileExistsError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not overwrite:
      raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
  os.mkdir(tmp)  # honours the umask, unlike tempfile.mkdtemp's 0700
  try:
    yield tmp
    if out.exists():
      old = out.parent / f".{out.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
      os.rename(out, old)
      os.rename(tmp, out)
      shutil.rmtree(old)
    else:
      os.rename(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)


def make_image_dataset(out_dir: str | os.PathLike, num_images: int,
                       size: Sequence[int] = (256, 256), seed: int = 0, *,
                       min_area: int | None = None, overwrite: bool = False,
                       progress: Progress | None = None, style: str = "basic") -> Path:
  """Writes a COCO-format instance segmentation dataset of `num_images` synthetic images.

  Args:
    out_dir: target directory (created; must be absent or empty unless `overwrite`).
    num_images: number of images.
    size: (height, width) in pixels, each >= 16.
    seed: non-negative seed; image i depends only on (seed, i).
    min_area: shapes with fewer visible pixels get no annotation (default:
      `default_min_area(size)`, which every image meets at least once); they stay in the
      picture as unlabelled clutter.
    overwrite: replace an existing non-empty `out_dir`.
    progress: called with 1 after each image (e.g. `tqdm(total=n).update`).
    style: "basic" or "varied" (`synth_image`); the categories are `categories(style)`.

  Returns:
    The dataset directory: `images/*.jpg` and `annotations.json` (image `file_name`s are
    relative to it).
  """
  num_images = _check_count(num_images, "num_images")
  h, w = _check_size(size)
  seed = _check_count(seed, "seed", 0)
  min_area = default_min_area((h, w)) if min_area is None else int(min_area)
  style = _check_style(style)
  images, annotations = [], []
  with _atomic_dir(out_dir, overwrite) as tmp:
    (tmp / "images").mkdir()
    for i in range(num_images):
      sample = synth_image(seed, i, (h, w), style)
      image_id = i + 1
      file_name = f"images/{image_id:06d}.jpg"
      Image.fromarray(sample.image).save(tmp / file_name, quality=JPEG_QUALITY)
      images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
      annotations += image_annotations(sample, image_id, len(annotations) + 1, min_area)
      if progress is not None:
        progress(1)
    info = {"description": "qsam2_jax synthetic shapes", "seed": seed, "size": [h, w],
            "min_area": min_area}
    if style != "basic":   # basic datasets stay byte-identical to those written before styles
      info["style"] = style
    coco = {"info": info, "images": images, "annotations": annotations,
            "categories": list(categories(style))}
    (tmp / "annotations.json").write_text(json.dumps(coco))
  return Path(out_dir)


def make_video_dataset(out_dir: str | os.PathLike, num_videos: int, num_frames: int,
                       size: Sequence[int] = (256, 256), seed: int = 0, *,
                       overwrite: bool = False, progress: Progress | None = None,
                       style: str = "basic") -> Path:
  """Writes a DAVIS-layout video object segmentation dataset of synthetic videos.

  Args:
    out_dir: target directory (created; must be absent or empty unless `overwrite`).
    num_videos: number of videos, named `synth_0000`, `synth_0001`, ...
    num_frames: frames per video (>= 3 for an object that leaves and re-enters).
    size: (height, width) in pixels, each >= 16.
    seed: non-negative seed; video i depends only on (seed, i).
    overwrite: replace an existing non-empty `out_dir`.
    progress: called with 1 after each video.
    style: "basic" or "varied" (`synth_video`).

  Returns:
    The dataset directory: `JPEGImages/<video>/%05d.jpg`, `Annotations/<video>/%05d.png`
    (palette PNGs, ids 1..K) and `meta.json`.
  """
  num_videos = _check_count(num_videos, "num_videos")
  num_frames = _check_count(num_frames, "num_frames")
  h, w = _check_size(size)
  seed = _check_count(seed, "seed", 0)
  meta = {"description": "qsam2_jax synthetic videos", "seed": seed, "size": [h, w],
          "num_frames": num_frames, "videos": {}}
  if _check_style(style) != "basic":
    meta["style"] = style
  with _atomic_dir(out_dir, overwrite) as tmp:
    for i in range(num_videos):
      name = f"synth_{i:04d}"
      video = synth_video(seed, i, num_frames, (h, w), style)
      img_dir, ann_dir = tmp / "JPEGImages" / name, tmp / "Annotations" / name
      img_dir.mkdir(parents=True)
      ann_dir.mkdir(parents=True)
      for t in range(num_frames):
        Image.fromarray(video.frames[t]).save(img_dir / f"{t:05d}.jpg", quality=JPEG_QUALITY)
        save_palette_png(video.labels[t], ann_dir / f"{t:05d}.png")
      meta["videos"][name] = {"num_objects": int(video.full_masks.shape[0]),
                              "wanderer": video.wanderer}
      if progress is not None:
        progress(1)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  return Path(out_dir)


# ----------------------------------------------------------------------------------- defaults
# The embedded data every command runs on when given none, generated on first use into a cache
# folder (`$QSAM2_CACHE`, default `~/.cache/qsam2_jax`) and reused afterwards.

DEFAULT_IMAGE_SIZE = 256  # the reduced input size of the embedded model and data


def cache_dir() -> str:
  """The folder of the embedded defaults (created if missing)."""
  root = os.environ.get("QSAM2_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                       "qsam2_jax")
  os.makedirs(root, exist_ok=True)
  return root


def _style_key(style: str) -> str:
  """The cache-name suffix of a style (none for basic: its folders predate styles)."""
  return "" if _check_style(style) == "basic" else f"_{style}"


def default_image_data(num_images: int = 32, image_size: int = DEFAULT_IMAGE_SIZE,
                       seed: int = 0, style: str = "basic") -> str:
  """A synthetic COCO-format dataset folder (images + annotations.json)."""
  out = os.path.join(cache_dir(),
                     f"synthetic_images_{num_images}_{image_size}_{seed}{_style_key(style)}")
  if not os.path.exists(os.path.join(out, "annotations.json")):
    try:
      make_image_dataset(out, num_images, size=(image_size, image_size), seed=seed,
                         style=style)
    except FileExistsError:
      pass  # another process created it meanwhile
  return out


def default_video_data(num_videos: int = 2, num_frames: int = 8,
                       image_size: int = DEFAULT_IMAGE_SIZE, seed: int = 0,
                       style: str = "basic") -> str:
  """A synthetic DAVIS-layout video dataset folder (JPEGImages/, Annotations/)."""
  out = os.path.join(cache_dir(), f"synthetic_videos_{num_videos}x{num_frames}_{image_size}_"
                                  f"{seed}{_style_key(style)}")
  if not os.path.isdir(os.path.join(out, "Annotations")):
    try:
      make_video_dataset(out, num_videos, num_frames, size=(image_size, image_size), seed=seed,
                         style=style)
    except FileExistsError:
      pass
  return out
