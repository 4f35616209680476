"""Generated street scenes in the Cityscapes layout: a segmentation task to train and score on without a
download (``train_segmentation.py``'s tests, ``bench/segmentation_scenes.py``).

:func:`write_street_scenes` writes ``leftImg8bit/<split>/<city>/<id>_leftImg8bit.png`` and
``gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png`` (the 19 Cityscapes train ids, 255 = not evaluated),
so :func:`spformer.eval.datasets.open_dataset` reads them as Cityscapes. Each picture is a street seen
from a car: sky on top; buildings (facades with window grids), trees, walls and fences along a horizon;
a road in perspective (lane marks) with sidewalks (tiles) and grass verges; thin poles carrying traffic
signs and lights; cars, trucks, buses, now and then a tram, persons on the sidewalks, riders on bicycles
and motorcycles; sometimes the ego car's bonnet at the bottom (255). The label map is the drawing itself,
exact to the pixel.

Each class has its own colour and texture distribution, drawn afresh per image and per object (a
building's facade colour, a car's paint, a person's clothes; the sky's shade, the light of the scene), and
colours overlap between some classes (person and rider, wall and building, sidewalk and road, truck and
bus), so that colour alone does not solve the task: shape, texture and context do. Small classes (poles,
signs, lights, bicycles) are a few pixels wide, as in Cityscapes. A picture depends only on
(seed, split, index): the same arguments write the same files.

:func:`street_scenes_hf` turns written scenes into a Hugging Face ``datasets.DatasetDict`` (``image`` and
``label`` image columns), for the ``--hf-dataset`` path of the training script.
"""
import os
import zlib
from typing import Dict, List, Sequence, Tuple

import numpy as np

from .datasets import CITYSCAPES_CLASSES

__all__ = ['write_street_scenes', 'render_street_scene', 'street_scenes_hf', 'STREET_CITIES', 'IGNORE']

(ROAD, SIDEWALK, BUILDING, WALL, FENCE, POLE, LIGHT, SIGN, VEGETATION, TERRAIN, SKY, PERSON, RIDER, CAR, TRUCK,
 BUS, TRAIN, MOTORCYCLE, BICYCLE) = range(19)
IGNORE = 255
assert CITYSCAPES_CLASSES[BICYCLE] == 'bicycle' and CITYSCAPES_CLASSES[SKY] == 'sky'
# The "cities" of a split (Cityscapes keeps a city in one split).
STREET_CITIES = {'train': ('alderton', 'brookfield'), 'val': ('castlemere',), 'test': ('dunmore',)}

# Mean colour of each class (RGB); every image and object draws its own around it.
_BASE = {
    ROAD: (92, 90, 96), SIDEWALK: (150, 138, 142), BUILDING: (150, 120, 100), WALL: (140, 128, 112),
    FENCE: (120, 104, 80), POLE: (80, 80, 86), LIGHT: (34, 34, 30), SIGN: (200, 180, 40), VEGETATION: (70, 118, 45),
    TERRAIN: (130, 140, 78), SKY: (120, 165, 215), PERSON: (120, 80, 90), RIDER: (120, 80, 90), CAR: (60, 60, 140),
    TRUCK: (200, 200, 196), BUS: (210, 170, 40), TRAIN: (170, 175, 180), MOTORCYCLE: (50, 50, 56),
    BICYCLE: (40, 44, 40), IGNORE: (30, 30, 34),
}
_FACADES = ((186, 160, 126), (150, 82, 64), (160, 160, 166), (214, 200, 170), (120, 110, 100), (196, 140, 100))
_PAINTS = ((200, 30, 30), (30, 60, 170), (230, 230, 230), (25, 25, 28), (120, 125, 130), (40, 120, 60),
           (220, 180, 40), (140, 20, 40))
_CLOTHES = ((30, 30, 40), (160, 30, 40), (40, 70, 140), (200, 190, 170), (60, 100, 60), (110, 80, 50),
            (220, 120, 30), (90, 90, 95))


class _Canvas:
    """The label map, an object map (one id per painted object) and each object's class, painted in order."""

    def __init__(self, H: int, W: int):
        self.H, self.W = H, W
        self.yy, self.xx = np.mgrid[0:H, 0:W].astype(np.float64)
        self.label = np.full((H, W), SKY, np.int64)
        self.obj = np.zeros((H, W), np.int64)
        self.objects: List[Tuple[int, Dict]] = [(SKY, {})]

    def paint(self, mask: np.ndarray, cls: int, **params) -> int:
        self.objects.append((cls, params))
        k = len(self.objects) - 1
        self.label[mask] = cls
        self.obj[mask] = k
        return k

    def rect(self, y0, y1, x0, x1) -> np.ndarray:
        return (self.yy >= y0) & (self.yy < y1) & (self.xx >= x0) & (self.xx < x1)

    def ellipse(self, cy, cx, ry, rx) -> np.ndarray:
        return ((self.yy - cy) / max(ry, 0.5)) ** 2 + ((self.xx - cx) / max(rx, 0.5)) ** 2 <= 1

    def line(self, y0, x0, y1, x1, width) -> np.ndarray:
        """Pixels within width/2 of the segment (y0, x0)-(y1, x1)."""
        dy, dx = y1 - y0, x1 - x0
        t = np.clip(((self.yy - y0) * dy + (self.xx - x0) * dx) / max(dy * dy + dx * dx, 1e-9), 0, 1)
        return (self.yy - y0 - t * dy) ** 2 + (self.xx - x0 - t * dx) ** 2 <= (width / 2) ** 2


def _smooth_noise(rng: np.random.Generator, H: int, W: int, scale: float) -> np.ndarray:
    """Noise in [-1, 1] smooth over about `scale` pixels (a coarse random grid, bilinearly upsampled)."""
    gh, gw = max(2, int(H / scale) + 2), max(2, int(W / scale) + 2)
    grid = rng.uniform(-1, 1, (gh, gw))
    ys, xs = np.linspace(0, gh - 1.001, H), np.linspace(0, gw - 1.001, W)
    y0, x0 = ys.astype(int), xs.astype(int)
    fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
    g = grid
    return ((1 - fy) * (1 - fx) * g[y0][:, x0] + (1 - fy) * fx * g[y0][:, x0 + 1]
            + fy * (1 - fx) * g[y0 + 1][:, x0] + fy * fx * g[y0 + 1][:, x0 + 1])


def _jitter(rng: np.random.Generator, colour, amount: float) -> np.ndarray:
    return np.clip(np.asarray(colour, np.float64) + rng.normal(0, amount, 3), 0, 255)


def _compose(c: _Canvas, rng: np.random.Generator) -> None:
    """Paint the scene's regions into the canvas, far to near."""
    H, W = c.H, c.W
    s = W / 256  # sizes below are for a 256-pixel-wide picture
    yh = H * rng.uniform(0.38, 0.5)  # the horizon: background objects stand on it, the ground starts there
    vx = W * rng.uniform(0.35, 0.65)  # the vanishing point of the road

    # Along the horizon: buildings, trees, walls (left to right, random widths and heights).
    x = -rng.uniform(0, 20) * s
    while x < W:
        width = rng.uniform(0.08, 0.28) * W
        kind = rng.choice(['building', 'building', 'building', 'trees', 'trees', 'gap'])
        if kind == 'building':
            top = yh * rng.uniform(0.05, 0.7)
            c.paint(c.rect(top, yh + 1, x, x + width), BUILDING, facade=_FACADES[rng.integers(len(_FACADES))],
                    window=rng.uniform(4, 9) * s, box=(top, x, yh, x + width))
        elif kind == 'trees':
            mask = np.zeros((H, W), bool)
            for _ in range(rng.integers(2, 5)):
                r = rng.uniform(0.08, 0.2) * H
                cx, cy = x + rng.uniform(0, width), yh - rng.uniform(0.4, 1.5) * r
                mask |= c.ellipse(cy, cx, r, r * rng.uniform(0.8, 1.4))
                mask |= c.rect(cy, yh + 1, cx - 1.5 * s, cx + 1.5 * s)  # the trunk (vegetation in Cityscapes)
            c.paint(mask, VEGETATION)
        x += width
    for _ in range(rng.integers(0, 3)):  # low walls in front of the buildings
        x0, h = rng.uniform(-0.1, 0.9) * W, rng.uniform(0.04, 0.1) * H
        c.paint(c.rect(yh - h, yh + 1, x0, x0 + rng.uniform(0.08, 0.3) * W), WALL)
    if rng.random() < 0.15:  # a tram along the horizon
        x0, h = rng.uniform(-0.2, 0.6) * W, rng.uniform(0.1, 0.16) * H
        c.paint(c.rect(yh - h, yh + 0.02 * H, x0, x0 + rng.uniform(0.3, 0.5) * W), TRAIN, stripe=rng.random() < 0.7)

    # The ground in perspective: road between two edges from the vanishing point, sidewalks, verges.
    t = np.clip((c.yy - yh) / (H - yh), 0, None)
    below = c.yy >= yh
    left, right = vx + rng.uniform(-0.55, -0.3) * W, vx + rng.uniform(0.3, 0.55) * W  # road edges at the bottom
    walk = rng.uniform(0.12, 0.3) * W
    road = below & (c.xx >= vx + t * (left - vx)) & (c.xx < vx + t * (right - vx))
    walk_l = below & ~road & (c.xx < vx) & (c.xx >= vx + t * (left - walk - vx))
    walk_r = below & ~road & (c.xx >= vx) & (c.xx < vx + t * (right + walk - vx))
    verge = below & ~road & ~walk_l & ~walk_r
    c.paint(verge, TERRAIN if rng.random() < 0.6 else SIDEWALK, tile=rng.uniform(6, 12) * s)
    c.paint(walk_l | walk_r, SIDEWALK, tile=rng.uniform(6, 12) * s)
    c.paint(road, ROAD, vx=vx, yh=yh, dash=rng.random() < 0.8)

    def edge_x(side: int, y: float, into_walk: float) -> float:
        """x on the sidewalk at row y: its inner edge plus a fraction of its width."""
        tt = (y - yh) / (H - yh)
        base = left if side < 0 else right
        return vx + tt * (base - vx) + side * tt * walk * into_walk

    if rng.random() < 0.5:  # a fence along one sidewalk's outer edge
        side = rng.choice([-1, 1])
        y0, y1 = yh + rng.uniform(0.0, 0.1) * (H - yh), yh + rng.uniform(0.3, 0.6) * (H - yh)
        xa, xb = edge_x(side, y0, 1.0), edge_x(side, y1, 1.0)
        h = rng.uniform(0.06, 0.12) * H
        fence = c.line(y0 - h / 2, xa, y1 - h / 2, xb, h * (y1 - yh) / (H - yh) + 2 * s)
        c.paint(fence, FENCE, bar=rng.uniform(2.5, 4) * s)

    # Things, far (near the horizon) to near (the bottom), each scaled by its distance.
    things = []
    for _ in range(rng.integers(1, 4)):
        things.append(('pole', rng.uniform(0.15, 0.9)))
    for _ in range(rng.integers(0, 4)):
        things.append(('person', rng.uniform(0.1, 0.9)))
    for _ in range(rng.integers(1, 5)):
        things.append(('vehicle', rng.uniform(0.08, 0.8)))
    for _ in range(rng.integers(0, 2)):
        things.append(('rider', rng.uniform(0.1, 0.8)))
    for kind, depth in sorted(things, key=lambda k: k[1]):
        y = yh + depth * (H - yh)  # where it stands
        k = 0.25 + depth  # its scale
        if kind == 'pole':
            side = rng.choice([-1, 1])
            xp = edge_x(side, y, rng.uniform(0.3, 0.9))
            top = y - rng.uniform(0.35, 0.6) * H * k
            w = max(1.0, rng.uniform(1.2, 2.2) * s * k)
            c.paint(c.rect(top, y, xp - w / 2, xp + w / 2), POLE)
            fitting = rng.choice(['sign', 'light', 'none'], p=[0.45, 0.4, 0.15])
            if fitting == 'sign':
                r = rng.uniform(3, 5) * s * k
                shape = c.ellipse(top + r, xp, r, r) if rng.random() < 0.5 else c.rect(top, top + 2 * r, xp - r, xp + r)
                c.paint(shape, SIGN, colour=[(200, 30, 30), (30, 70, 180), (220, 190, 30)][rng.integers(3)])
            elif fitting == 'light':
                hw, hh = rng.uniform(2, 3) * s * k, rng.uniform(5, 8) * s * k
                c.paint(c.rect(top, top + 2 * hh, xp - hw, xp + hw), LIGHT, lit=int(rng.integers(3)), box=(top, hh))
        elif kind == 'person':
            side = rng.choice([-1, 1])
            xp = edge_x(side, y, rng.uniform(0.1, 0.9))
            h = rng.uniform(0.16, 0.24) * H * k
            body = c.ellipse(y - h * 0.42, xp, h * 0.42, h * 0.13) | c.ellipse(y - h * 0.9, xp, h * 0.1, h * 0.08)
            c.paint(body, PERSON, top=_CLOTHES[rng.integers(len(_CLOTHES))],
                    legs=_CLOTHES[rng.integers(len(_CLOTHES))], mid=y - h * 0.45)
        elif kind == 'rider':
            xp = vx + (y - yh) / (H - yh) * rng.uniform(-0.4, 0.4) * W
            h = rng.uniform(0.18, 0.24) * H * k
            motor = rng.random() < 0.4
            r = h * 0.16
            wheels = np.zeros((H, W), bool)
            for dx in (-1.6 * r, 1.6 * r):
                ring = c.ellipse(y - r, xp + dx, r, r)
                wheels |= ring if motor else ring & ~c.ellipse(y - r, xp + dx, r * 0.6, r * 0.6)
            frame = c.line(y - r, xp - 1.6 * r, y - 2.2 * r, xp + 0.3 * r, max(1.0, 1.5 * s * k)) | \
                c.line(y - 2.2 * r, xp + 0.3 * r, y - r, xp + 1.6 * r, max(1.0, 1.5 * s * k))
            if motor:
                frame |= c.ellipse(y - 1.6 * r, xp, 0.7 * r, 1.5 * r)
            c.paint(wheels | frame, MOTORCYCLE if motor else BICYCLE)
            body = c.ellipse(y - 2.2 * r - h * 0.3, xp - 0.2 * r, h * 0.3, h * 0.12) | \
                c.ellipse(y - 2.2 * r - h * 0.68, xp - 0.1 * r, h * 0.09, h * 0.075)
            c.paint(body, RIDER, top=_CLOTHES[rng.integers(len(_CLOTHES))], legs=_CLOTHES[rng.integers(len(_CLOTHES))],
                    mid=y - 2.2 * r - h * 0.2)
        else:
            kind = rng.choice([CAR, CAR, CAR, CAR, TRUCK, BUS])
            xp = vx + (y - yh) / (H - yh) * rng.uniform(-0.35, 0.35) * W
            w = {CAR: rng.uniform(0.2, 0.3), TRUCK: rng.uniform(0.25, 0.35), BUS: rng.uniform(0.35, 0.5)}[kind] * W * k * 0.8
            h = w * {CAR: rng.uniform(0.45, 0.6), TRUCK: rng.uniform(0.8, 1.0), BUS: rng.uniform(0.6, 0.75)}[kind]
            box = (y - h, xp - w / 2, y, xp + w / 2)
            shape = c.rect(*box[::2], *box[1::2]) if kind != CAR else (
                c.rect(y - 0.6 * h, y, xp - w / 2, xp + w / 2) | c.ellipse(y - 0.6 * h, xp, 0.4 * h, 0.33 * w))
            colour = _PAINTS[rng.integers(len(_PAINTS))] if kind == CAR else _BASE[kind]
            c.paint(shape, kind, colour=colour, box=box)

    if rng.random() < 0.3:  # the ego car's bonnet: not evaluated, as in Cityscapes
        top = H * rng.uniform(0.9, 0.95)
        c.paint(c.ellipse(H + (H - top) * 2, W / 2, (H - top) * 3, W * 0.7), IGNORE)


def _render(c: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """The picture of a composed canvas: each object's colour and texture (float RGB)."""
    H, W = c.H, c.W
    yy, xx = c.yy, c.xx
    image = np.zeros((H, W, 3))
    light = rng.uniform(0.8, 1.15)  # the scene's light
    shade = {cls: _jitter(rng, _BASE[cls], 14) for cls in _BASE}  # this image's colour of each class
    fine = rng.normal(0, 1, (H, W))
    for k, (cls, p) in enumerate(c.objects):
        mask = c.obj == k
        if not mask.any():
            continue
        base = shade[cls]
        if cls == SKY:
            lighter = np.clip(base + rng.uniform(30, 70), 0, 255)
            g = np.clip(yy / max(1, H * 0.5), 0, 1)[..., None]
            tex = base * (1 - g) + lighter * g + 25 * np.clip(_smooth_noise(rng, H, W, 24), 0, 1)[..., None]
        elif cls == ROAD:
            tex = base + 6 * fine[..., None]
            if p['dash']:  # dashed centre line towards the vanishing point
                t = np.clip((yy - p['yh']) / (H - p['yh']), 0, None)
                on = (np.abs(xx - p['vx']) < 0.5 + 2.5 * t * W / 256) & (np.sin(28 * np.log1p(6 * t)) > 0.2)
                tex = np.where(on[..., None], [225, 225, 215], tex)
        elif cls == SIDEWALK:
            tile = p['tile']
            grout = ((yy % tile) < 1) | ((xx % (tile * 1.6)) < 1)
            tex = base + 5 * fine[..., None] - 30 * grout[..., None]
        elif cls == TERRAIN:
            tex = base + 16 * fine[..., None] + 18 * _smooth_noise(rng, H, W, 6)[..., None]
        elif cls == BUILDING:
            colour = _jitter(rng, p['facade'], 12)
            top, x0, _, _ = p['box']
            win = p['window']
            wy, wx = (yy - top - win * 0.6) % (win * 1.7), (xx - x0 - win * 0.5) % (win * 1.5)
            windows = (wy < win) & (wx < win * 0.8) & (yy > top + win * 0.5)
            glass = _jitter(rng, (60, 70, 85), 10)
            tex = np.where(windows[..., None], glass, colour + 4 * fine[..., None])
        elif cls == WALL:
            tex = base + 10 * _smooth_noise(rng, H, W, 10)[..., None] + 4 * fine[..., None]
        elif cls == FENCE:
            bars = ((xx % p['bar']) < p['bar'] * 0.5)[..., None]
            tex = np.where(bars, base + 30, base - 35)
        elif cls == VEGETATION:
            tex = base * (1 + 0.3 * _smooth_noise(rng, H, W, 4)[..., None]) + 10 * fine[..., None]
        elif cls == LIGHT:
            top, hh = p['box']
            tex = base + 0 * fine[..., None]
            lamp = (np.abs(yy - (top + hh * (0.5 + 0.5 * p['lit']))) < hh * 0.25)[..., None]
            tex = np.where(lamp, [(230, 40, 30), (240, 180, 30), (40, 220, 90)][p['lit']], tex)
        elif cls == SIGN:
            tex = np.broadcast_to(_jitter(rng, p['colour'], 15), (H, W, 3)) + 3 * fine[..., None]
        elif cls in (PERSON, RIDER):
            tex = np.where((yy < p['mid'])[..., None], _jitter(rng, p['top'], 20), _jitter(rng, p['legs'], 20))
            tex = tex + 5 * fine[..., None]
        elif cls in (CAR, TRUCK, BUS):
            y0, x0, y1, x1 = p['box']
            colour = _jitter(rng, p['colour'], 15)
            rel = (yy - y0) / max(y1 - y0, 1)
            band = {CAR: (0.1, 0.38), TRUCK: (0.08, 0.3), BUS: (0.12, 0.45)}[cls]
            windows = (rel > band[0]) & (rel < band[1])
            if cls == TRUCK:
                windows &= (xx - x0) < 0.35 * (x1 - x0)
            if cls == BUS:
                windows &= ((xx - x0) % ((x1 - x0) / 6)) > 1.2
            wheels = rel > 0.86
            tex = np.where(windows[..., None], _jitter(rng, (50, 60, 75), 8), colour)
            tex = np.where(wheels[..., None], [25, 25, 25], tex) + 4 * fine[..., None]
        elif cls == TRAIN:
            tex = base + 3 * fine[..., None]
            if p['stripe']:
                ys = yy[mask]
                mid = (ys.min() + ys.max()) / 2
                tex = np.where((np.abs(yy - mid) < 0.12 * (ys.max() - ys.min()))[..., None], [40, 80, 170], tex)
        else:  # POLE, MOTORCYCLE, BICYCLE, IGNORE: flat, a little noise
            tex = base + 5 * fine[..., None]
        image[mask] = np.broadcast_to(tex, (H, W, 3))[mask]
    image = image * light + rng.normal(0, 2.5, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(split.encode()), index])


def render_street_scene(size: Sequence[int] = (128, 256), seed: int = 0, split: str = 'train',
                        index: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """One scene: ((H, W, 3) uint8 RGB image, (H, W) int64 train ids with 255 = not evaluated); it depends
    only on (size, seed, split, index)."""
    H, W = int(size[0]), int(size[1])
    if H < 16 or W < 16:
        raise ValueError(f'size must be at least 16x16 pixels, got {tuple(size)}')
    rng = _rng(seed, split, index)
    canvas = _Canvas(H, W)
    _compose(canvas, rng)
    return _render(canvas, rng), canvas.label


def write_street_scenes(root: str, num_images: int, size: Sequence[int] = (128, 256), seed: int = 0,
                        split: str = 'train') -> str:
    """Write ``num_images`` scenes of ``split`` under ``root`` in the Cityscapes layout (see the module docstring);
    images are spread over the split's cities (:data:`STREET_CITIES`). Returns ``root``."""
    from PIL import Image
    cities = STREET_CITIES.get(split, (f'{split}city',))
    for i in range(num_images):
        image, label = render_street_scene(size, seed, split, i)
        city = cities[i % len(cities)]
        name = f'{city}_{i:06d}_000019'
        for folder, suffix, array in (('leftImg8bit', 'leftImg8bit', image),
                                      ('gtFine', 'gtFine_labelTrainIds', label.astype(np.uint8))):
            path = os.path.join(root, folder, split, city)
            os.makedirs(path, exist_ok=True)
            Image.fromarray(array).save(os.path.join(path, f'{name}_{suffix}.png'))
    return root


def street_scenes_hf(root: str, splits: Dict[str, str] = None):
    """The scenes written under ``root`` as a ``datasets.DatasetDict``: {hf split: Dataset with ``image`` and
    ``label`` (train-id PNG) image columns}; ``splits`` maps HF split names to the written ones (default
    train -> train, validation -> val). Save it with ``.save_to_disk(folder)``."""
    import datasets
    from .datasets import open_dataset
    splits = splits or {'train': 'train', 'validation': 'val'}
    features = datasets.Features({'image': datasets.Image(), 'label': datasets.Image()})
    out = {}
    for hf_split, split in splits.items():
        ds = open_dataset(root, 'cityscapes', split)
        out[hf_split] = datasets.Dataset.from_dict(
            {column: [dict(bytes=_read_bytes(path(n)), path=os.path.basename(path(n))) for n in ds.names]
             for column, path in (('image', ds.image_path), ('label', ds.label_path))}, features=features)
    return datasets.DatasetDict(out)


def _read_bytes(path: str) -> bytes:
    with open(path, 'rb') as f:
        return f.read()
