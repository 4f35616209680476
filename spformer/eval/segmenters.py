"""Segmentation methods to score: the patch grid, SLIC and a model's superpixels (or groups).

A :class:`Segmenter` turns (B, H, W, 3) uint8 images at the input size into a :class:`Segmentation`:
:class:`PatchGrid` (the ViT's regular grid), :class:`Slic` (scikit-image) and :class:`ModelSuperpixels`
(a model's hard association of one stage, the head-merged one by default, or one association head, at
one of the :data:`LEVELS`). :func:`resize_image` and :func:`resize_nearest` take images to a method's
input size and label maps back (the resolution policy of :mod:`spformer.eval.evaluation`).
"""
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Tuple, Union

import numpy as np
import torch

from spformer.eval.metrics import InputError

__all__ = ['resize_nearest', 'resize_image', 'Segmenter', 'Segmentation', 'PatchGrid', 'Slic', 'ModelSuperpixels',
           'Level', 'LEVELS']


def resize_nearest(labels: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (..., H, W) label map to (..., *size), sampling pixel centres."""
    labels = np.asarray(labels)
    H, W = labels.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return labels
    ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64)
    xs = ((np.arange(w) + 0.5) * W / w).astype(np.int64)
    return labels[..., ys[:, None], xs[None, :]]


def resize_image(image: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 image -> (*size, 3), bicubic (PIL, antialiased when shrinking)."""
    from PIL import Image
    if tuple(image.shape[:2]) == tuple(size):
        return np.asarray(image)
    return np.asarray(Image.fromarray(np.asarray(image)).resize((size[1], size[0]), Image.BICUBIC))


@dataclass
class Segmentation:
    """What a :class:`Segmenter` returns for a batch.

    Attributes:
        labels: (B, H, W) int64 segment maps that are scored.
        panels: Extra (title, (B, H, W) maps) drawn in the pictures (a model's association heads).
    """
    labels: np.ndarray
    panels: List[Tuple[str, np.ndarray]] = field(default_factory=list)


class Segmenter:
    """A segmentation method: (B, H, W, 3) uint8 images at the input size -> :class:`Segmentation`."""
    name: str = ''
    weights: str = ''  # what the weights are (models), shown in the table header

    def __call__(self, images: np.ndarray) -> Segmentation:
        raise NotImplementedError


class PatchGrid(Segmenter):
    """The regular grid of a ViT: ``rows`` x ``cols`` cells (16x16 px at 224 px for 196 segments)."""

    def __init__(self, segments: int = 196, name: str = 'patch'):
        side = math.isqrt(segments) if segments > 0 else 0
        if side * side != segments:
            raise InputError(f'segments={segments}: the patch grid needs a square number of cells '
                             f'(e.g. 196 = 14x14, 49 = 7x7)')
        self.rows = self.cols = side
        self.name = name

    def __call__(self, images: np.ndarray) -> Segmentation:
        B, H, W = images.shape[:3]
        ys = np.arange(H) * self.rows // H
        xs = np.arange(W) * self.cols // W
        grid = ys[:, None] * self.cols + xs[None, :]
        return Segmentation(np.broadcast_to(grid, (B, H, W)).astype(np.int64))


class Slic(Segmenter):
    """SLIC superpixels (Achanta et al., TPAMI 2012) from :func:`skimage.segmentation.slic`.

    scikit-image's ``n_segments`` only places seeds: connectivity enforcement then merges small
    fragments, which often leaves 20-40% fewer segments than asked for (196 -> 129 on the astronaut
    at 224 px). With ``match_count`` (default) ``n_segments`` is rescaled per image by the ratio
    asked / got, up to ``max_runs`` runs, and the run whose count is closest to ``segments`` is kept.
    """

    def __init__(self, segments: int = 196, compactness: float = 10.0, match_count: bool = True,
                 max_runs: int = 4, name: str = 'slic'):
        if segments < 1:
            raise InputError(f'segments must be >= 1, got {segments}')
        self.segments = segments
        self.compactness = compactness
        self.max_runs = max_runs if match_count else 1
        self.name = name

    def segment(self, image: np.ndarray) -> np.ndarray:
        """(H, W) labels of one (H, W, 3) image, the count closest to ``segments`` of the runs."""
        from skimage.segmentation import slic
        target = self.segments
        asked, runs, best = target, {}, None  # runs: n_segments asked -> segments got
        for _ in range(self.max_runs):
            labels = slic(image, n_segments=asked, compactness=self.compactness, start_label=0, channel_axis=-1)
            got = runs[asked] = int(labels.max()) + 1  # start_label=0 gives consecutive labels
            if best is None or abs(got - target) < abs(best[1] - target):
                best = labels, got
            if got == target:
                break
            below = [(a, g) for a, g in runs.items() if g < target]
            above = [(a, g) for a, g in runs.items() if g > target]
            if below and above:  # bracketed: interpolate between the closest runs on each side
                (a0, g0), (a1, g1) = max(below, key=lambda r: r[1]), min(above, key=lambda r: r[1])
                asked = round(a0 + (a1 - a0) * (target - g0) / (g1 - g0))
            else:  # scale by what is missing
                asked = max(1, round(asked * target / got))
            if asked in runs:
                break
        return best[0]

    def __call__(self, images: np.ndarray) -> Segmentation:
        return Segmentation(np.stack([self.segment(img) for img in images]).astype(np.int64))


def _superpixel_stages(model: torch.nn.Module, x: torch.Tensor, label_upsampling: str) -> List[Dict[str, object]]:
    return [dict(merged=s['labels'], heads=list(s['head_labels'].unbind(1)), grid=tuple(int(v) for v in s['grid']))
            for s in model.forward_superpixels(x, label_upsampling=label_upsampling)]


def _group_stages(model: torch.nn.Module, x: torch.Tensor, label_upsampling: str) -> List[Dict[str, object]]:
    return [dict(merged=g['labels'], heads=list(g['head_labels'].unbind(1)), grid=tuple(int(v) for v in g['grid']),
                 stage=g['stage']) for g in model.forward_groups(x, label_upsampling=label_upsampling)]


def _has_groups(model: torch.nn.Module) -> bool:
    return getattr(model, 'grouping', None) is not None


@dataclass(frozen=True)
class Level:
    """A level of a model's pixel grouping that can be scored.

    Attributes:
        method: The model method it needs (a model without it has nothing to score at this level).
        stages: (model, normalized input (B, 3, H, W), label upsampling: ``'bilinear'`` or ``'repeat'``, see
            ``SPFormer.forward_superpixels``) -> one dict per stage with ``merged`` (B, H, W)
            int64 labels of the merged heads, ``heads`` (a list of (B, H, W) labels, one per head)
            and ``grid`` (h, w), the token grid (h * w segments at most); optionally ``stage``, the
            model's 1-based stage the entry comes from (default: its position in the list + 1).
        noun: What its segments are called in titles.
        available: Whether a model with the method has this level (default: any model has).
        missing: What to say when it has not.
    """
    method: str
    stages: Callable[[torch.nn.Module, torch.Tensor, str], List[Dict[str, object]]]
    noun: str
    available: Callable[[torch.nn.Module], bool] = lambda model: True
    missing: str = ''


# Levels of a model that can be scored: superpixels (every SPFormer), and the pixel -> group labels of
# the hierarchical models (every pixel takes the group of its superpixel; docs/design.md §2).
LEVELS: Dict[str, Level] = {
    'superpixel': Level('forward_superpixels', _superpixel_stages, 'superpixels'),
    'group': Level('forward_groups', _group_stages, 'groups', _has_groups,
                   "it is not a hierarchical model (grouping=None); --level group needs one of "
                   "timm.list_models('spformer_hier*')"),
}


class ModelSuperpixels(Segmenter):
    """A model's hard segments at one level and stage: the merged heads, or one association head.

    Args:
        model: The model (eval mode); it must have the level's method (``forward_superpixels``).
        name: Name in tables and pictures (the model spec).
        stage: 1-based stage, or -1 for the last (default, docs/design.md §3).
        head: 'merged' (default: argmax of the head-merged association) or a 1-based head number.
        level: A key of :data:`LEVELS`.
        weights: Where the weights come from (shown in the table header).
        device: Where the model runs.
        trained: False for a random init: its picture panels are marked UNTRAINED.
        label_upsampling: How the hard maps reach input resolution: ``'bilinear'`` (the association
            logits resampled in superpixel perspective, as the SPFormer authors do; default) or
            ``'repeat'`` (the pixel stream's argmax repeated); see ``SPFormer.forward_superpixels``.
    """

    def __init__(self, model: torch.nn.Module, name: str, stage: int = -1, head: Union[str, int] = 'merged',
                 level: str = 'superpixel', weights: str = '', device: Union[str, torch.device] = 'cpu',
                 trained: bool = True, label_upsampling: str = 'bilinear'):
        from timm.data import resolve_data_config
        if level not in LEVELS:
            raise InputError(f'level must be one of {", ".join(LEVELS)}; got {level!r}')
        self.level = LEVELS[level]
        if not callable(getattr(model, self.level.method, None)):
            raise InputError(
                f'--model {name!r}: {type(model).__name__} has no {self.level.method}(), so it makes no '
                f'{self.level.noun} to score; use an SPFormer (timm.list_models("spformer*")) or only '
                f'the patch / slic methods')
        if not self.level.available(model):
            raise InputError(f'--model {name!r}: it makes no {self.level.noun} to score: {self.level.missing}')
        if label_upsampling not in ('bilinear', 'repeat'):
            raise InputError(f"--label-upsampling {label_upsampling!r}: expected 'bilinear' or 'repeat'")
        self.model, self.weights, self.device, self.trained = model, weights, device, trained
        self.label_upsampling = label_upsampling
        cfg = resolve_data_config({}, model=model)
        self.input_size = tuple(cfg['input_size'][1:])
        self.mean = torch.tensor(cfg['mean']).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg['std']).view(1, 3, 1, 1)

        # A probe at the input size: how many stages and heads, and the token grid.
        probe = self.stages(np.zeros((1, *self.input_size, 3), np.uint8))
        n_stages = len(probe)
        numbers = [int(entry.get('stage', i + 1)) for i, entry in enumerate(probe)]  # the model's stage numbers
        if numbers == list(range(1, n_stages + 1)):
            if stage == 0 or not -n_stages <= stage <= n_stages:
                raise InputError(f'--stage {stage}: {name} has {n_stages} stages; expected 1..{n_stages} or -1 (last)')
            self.stage = stage - 1 if stage > 0 else n_stages + stage
        elif stage in numbers or -n_stages <= stage < 0:
            self.stage = numbers.index(stage) if stage > 0 else n_stages + stage
        else:
            raise InputError(f'--stage {stage}: {name} has {self.level.noun} at stage '
                             f'{", ".join(map(str, numbers))} only; expected that or -1 (last)')
        self.stage_number = numbers[self.stage]
        self.num_heads = len(probe[self.stage]['heads'])
        if head != 'merged':
            if isinstance(head, str) and not head.isdigit():
                raise InputError(f"--head {head!r}: expected 'merged' or a head number 1..{self.num_heads}")
            head = int(head)
            if not 1 <= head <= self.num_heads:
                raise InputError(f'--head {head}: {name} has {self.num_heads} association heads; '
                                 f"expected 'merged' or 1..{self.num_heads}")
        self.head = head
        self.grid = probe[self.stage]['grid']
        self.tokens = self.grid[0] * self.grid[1]
        details = [] if stage == -1 or self.stage == n_stages - 1 else [f'stage {self.stage_number}']
        details += [] if head == 'merged' else [f'head {head}']
        details += [] if level == 'superpixel' else [level]
        self.name = f'{name} ({", ".join(details)})' if details else name

    def stages(self, images: np.ndarray) -> List[Dict[str, object]]:
        """The level's per-stage label dicts (see :class:`Level`) of (B, H, W, 3) uint8 images at the input size."""
        x = torch.tensor(np.asarray(images, np.uint8))  # a copy: the images may be read-only
        x = x.permute(0, 3, 1, 2).float().div(255)
        x = ((x - self.mean) / self.std).to(self.device)
        with torch.inference_mode():
            return self.level.stages(self.model, x, self.label_upsampling)

    def __call__(self, images: np.ndarray) -> Segmentation:
        stage = self.stages(images)[self.stage]
        heads = [h.cpu().numpy() for h in stage['heads']]
        merged = stage['merged'].cpu().numpy()
        labels = merged if self.head == 'merged' else heads[self.head - 1]
        panels = [(f'{self.name}\nhead {m + 1}', h) for m, h in enumerate(heads)]
        if self.head != 'merged':
            panels.insert(0, (f'{self.name}\nmerged heads', merged))
        return Segmentation(labels.astype(np.int64), panels)
