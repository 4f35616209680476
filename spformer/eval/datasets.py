"""Segmentation ground truth on disk, for scoring superpixels (:mod:`spformer.eval`) and training
segmenters.

Five layouts, found by :func:`open_dataset` (``layout='auto'``) or named explicitly:

``voc``    Pascal VOC 2012::

               JPEGImages/<id>.jpg
               SegmentationClass/<id>.png        palette PNG, class indices 0..20, 255 = ignore
               ImageSets/Segmentation/<split>.txt one <id> per line (split 'val' by default)

           The root may also be ``VOCdevkit/`` (holding ``VOC2012/``).

``bsds``   BSDS500::

               images/<split>/<id>.jpg
               groundTruth/<split>/<id>.mat      MATLAB cell array ``groundTruth`` of structs with a
                                                 ``Segmentation`` field (uint16 segment ids from 1),
                                                 one per human annotator (split 'test' by default)

           The root may also be the folder holding ``data/`` (``BSR/BSDS500``) or ``BSDS500/data``
           (``BSR``). Every human segmentation is scored and the scores are averaged per image.
           Segment ids are not classes, and there is no ignore label.

``cityscapes`` Cityscapes fine annotations::

               leftImg8bit/<split>/<city>/<id>_leftImg8bit.png
               gtFine/<split>/<city>/<id>_gtFine_labelTrainIds.png   train ids 0..18, 255 = not evaluated
                                                 (or <id>_gtFine_labelIds.png, mapped to train ids here)

           The root may also hold ``cityscapes/``. Split 'val' by default.

``ade20k`` ADE20K SceneParsing (ADEChallengeData2016)::

               images/<split>/<id>.jpg
               annotations/<split>/<id>.png      1..150 = classes 0..149, 0 = other (ignored)

           The root may also hold ``ADEChallengeData2016/``. Split 'validation' by default.

``folder`` a plain folder::

               images/<name>.<jpg|jpeg|png|bmp|tif|tiff>
               labels/<name>.png                 single-channel (palette, 8- or 16-bit grey) label ids

           Labels are classes; ``ignore_index`` (255 by default) marks pixels to skip. This covers
           Pascal-Parts-58 and other datasets once converted to label PNGs.

Every layout yields :class:`Sample` objects: the RGB image and one or more label maps of the same
size. Problems (a folder in no layout, images without labels, labels of another size, RGB label
PNGs) raise :class:`DatasetError` naming the files.

Images are read by :func:`read_image`, i.e. :func:`spformer.images.read_rgb`, as every spformer tool
reads them: 16-bit images (PNG, TIFF) scaled by their full range rather than clipped, EXIF orientation
applied, transparency composited onto white; an unreadable image (truncated, empty, not an image, ...)
raises :class:`spformer.images.ImageReadError` naming the file. Label maps are read as they are
(their values are ids, not colours).

:func:`write_shapes_dataset` writes a small dataset of flat and textured shapes with exact label
maps in any of the layouts: a smoke test of the evaluation (and of the layouts) without downloads.
"""
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from spformer.errors import UserError
from spformer.images import ImageReadError, read_rgb

__all__ = ['Sample', 'SegmentationDataset', 'VOCSegmentation', 'BSDS500', 'Cityscapes', 'ADE20K', 'LabelFolder',
           'DatasetError', 'open_dataset', 'LAYOUTS', 'read_image', 'write_shapes_dataset', 'ImageReadError',
           'VOC_CLASSES', 'CITYSCAPES_CLASSES', 'CITYSCAPES_TRAIN_IDS', 'ADE20K_CLASSES']

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff')


# Class names of the layouts whose labels are classes (index = label value after the reader's mapping).
VOC_CLASSES = (
    'background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
    'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train', 'tvmonitor')
# Cityscapes' 19 evaluated classes, in train-id order (cityscapesscripts' labels.py).
CITYSCAPES_CLASSES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign', 'vegetation',
    'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train', 'motorcycle', 'bicycle')
# Cityscapes label id (gtFine_labelIds.png, 0..33) -> train id (0..18, 255 = not evaluated), as
# cityscapesscripts' createTrainIdLabelImgs writes gtFine_labelTrainIds.png.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                        26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# ADE20K (SceneParsing, ADEChallengeData2016): annotation value v in 1..150 is class v - 1; 0 ("other") is ignored.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel', 'light',
    'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')


class DatasetError(UserError):
    """A dataset folder that cannot be read: which files were expected and which are missing."""


@dataclass
class Sample:
    """One image and its ground truth.

    Attributes:
        name: Image id (file name without extension).
        image: (H, W, 3) uint8 RGB image.
        ground_truths: One or more (H, W) integer label maps (several for BSDS500: one per human).
    """
    name: str
    image: np.ndarray
    ground_truths: List[np.ndarray]


class SegmentationDataset:
    """Base of the layouts: a list of image ids, and how to read one.

    Attributes:
        layout: A key of :data:`LAYOUTS`.
        root: The folder the files were found in.
        split: The split read ('val', 'test', ...; None for a plain folder).
        names: Image ids, in the order they are evaluated.
        label_kind: 'class' when label values are classes shared by all images (oracle mIoU is then
            computed over the whole dataset), 'segment' when they are per-image segment ids (BSDS500:
            oracle mIoU is computed per ground truth and averaged).
        ignore_index: Label value of pixels to skip, or None.
        class_names: The class of each label value (``class_names[v]``) where the layout defines them
            (VOC, Cityscapes, ADE20K), else None.
    """
    layout: str = ''
    label_kind: str = 'class'
    class_names: Optional[Sequence[str]] = None

    def __init__(self, root: str, names: Sequence[str], split: Optional[str], ignore_index: Optional[int]):
        self.root = root
        self.names = list(names)
        self.split = split
        self.ignore_index = ignore_index

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> Sample:
        name = self.names[index]
        image = read_image(self.image_path(name))
        ground_truths = self.read_ground_truths(name)
        for gt in ground_truths:
            if gt.shape != image.shape[:2]:
                raise DatasetError(
                    f'{self.label_path(name)}: label map is {gt.shape[1]}x{gt.shape[0]} (WxH) but the image '
                    f'{self.image_path(name)} is {image.shape[1]}x{image.shape[0]}; they must be the same size')
        return Sample(name, image, ground_truths)

    def describe(self) -> str:
        split = f', split {self.split}' if self.split else ''
        return f'{self.layout} ({self.root}{split}, {len(self)} images)'

    def image_path(self, name: str) -> str:
        raise NotImplementedError

    def label_path(self, name: str) -> str:
        raise NotImplementedError

    def read_ground_truths(self, name: str) -> List[np.ndarray]:
        return [_read_label_png(self.label_path(name))]


class VOCSegmentation(SegmentationDataset):
    """Pascal VOC 2012 segmentation (``JPEGImages``, ``SegmentationClass``, ``ImageSets/Segmentation``)."""
    layout = 'voc'
    label_kind = 'class'
    class_names = VOC_CLASSES

    def __init__(self, root: str, split: str = 'val', ignore_index: Optional[int] = 255):
        split_file = os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')
        if not os.path.isfile(split_file):
            have = _stems(os.path.join(root, 'ImageSets', 'Segmentation'), ('.txt',))
            raise DatasetError(
                f'Pascal VOC split file {split_file} not found (split {split!r}); '
                f'splits in this folder: {", ".join(have) or "none"}')
        with open(split_file) as f:
            names = [line.split()[0] for line in f if line.strip()]
        super().__init__(root, names, split, ignore_index)
        _require_pairs(self, 'JPEG image', self.image_path, 'SegmentationClass PNG', self.label_path)

    def image_path(self, name: str) -> str:
        return os.path.join(self.root, 'JPEGImages', f'{name}.jpg')

    def label_path(self, name: str) -> str:
        return os.path.join(self.root, 'SegmentationClass', f'{name}.png')


class BSDS500(SegmentationDataset):
    """BSDS500 (``images/<split>/*.jpg``, ``groundTruth/<split>/*.mat``), several humans per image."""
    layout = 'bsds'
    label_kind = 'segment'

    def __init__(self, root: str, split: str = 'test'):
        names = _split_jpegs(os.path.join(root, 'images'), split, 'BSDS500')
        super().__init__(root, names, split, ignore_index=None)
        _require_pairs(self, 'image', self.image_path, 'ground truth .mat', self.label_path)

    def image_path(self, name: str) -> str:
        return os.path.join(self.root, 'images', self.split, f'{name}.jpg')

    def label_path(self, name: str) -> str:
        return os.path.join(self.root, 'groundTruth', self.split, f'{name}.mat')

    def read_ground_truths(self, name: str) -> List[np.ndarray]:
        import scipy.io
        path = self.label_path(name)
        mat = scipy.io.loadmat(path, squeeze_me=True, struct_as_record=False)
        if 'groundTruth' not in mat:
            variables = ', '.join(k for k in mat if not k.startswith('__'))
            raise DatasetError(f'{path}: no "groundTruth" variable (it has: {variables or "none"})')
        humans = np.atleast_1d(mat['groundTruth'])
        segmentations = [np.asarray(h.Segmentation).astype(np.int64) for h in humans]
        if not segmentations:
            raise DatasetError(f'{path}: "groundTruth" holds no segmentation')
        return segmentations


class Cityscapes(SegmentationDataset):
    """Cityscapes fine annotations: ``leftImg8bit/<split>/<city>/*_leftImg8bit.png`` with
    ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` (19 classes, 255 = not evaluated), or, where those
    were not generated, ``*_gtFine_labelIds.png`` mapped to train ids here (:data:`CITYSCAPES_TRAIN_IDS`)."""
    layout = 'cityscapes'
    label_kind = 'class'
    class_names = CITYSCAPES_CLASSES

    def __init__(self, root: str, split: str = 'val', ignore_index: Optional[int] = 255):
        image_dir = _split_folder(os.path.join(root, 'leftImg8bit'), split, 'Cityscapes')
        suffix = '_leftImg8bit.png'
        names = sorted(f'{city}/{f[:-len(suffix)]}' for city in _listdir(image_dir)
                       if os.path.isdir(os.path.join(image_dir, city))
                       for f in _listdir(os.path.join(image_dir, city)) if f.endswith(suffix))
        if not names:
            raise DatasetError(f'Cityscapes split folder {image_dir} holds no <city>/*{suffix} images')
        super().__init__(root, names, split, ignore_index)
        _require_pairs(self, 'image', self.image_path, 'gtFine labelTrainIds or labelIds PNG', self.label_path)

    def image_path(self, name: str) -> str:
        return os.path.join(self.root, 'leftImg8bit', self.split, f'{name}_leftImg8bit.png')

    def label_path(self, name: str) -> str:
        """The train-id PNG where it exists, else the label-id PNG (mapped when read)."""
        train_ids = os.path.join(self.root, 'gtFine', self.split, f'{name}_gtFine_labelTrainIds.png')
        if os.path.isfile(train_ids):
            return train_ids
        return os.path.join(self.root, 'gtFine', self.split, f'{name}_gtFine_labelIds.png')

    def read_ground_truths(self, name: str) -> List[np.ndarray]:
        path = self.label_path(name)
        label = _read_label_png(path)
        if path.endswith('_gtFine_labelIds.png'):
            lookup = np.full(max(256, int(label.max()) + 1), 255, np.int64)
            for label_id, train_id in CITYSCAPES_TRAIN_IDS.items():
                lookup[label_id] = train_id
            label = lookup[label]
        return [label]


class ADE20K(SegmentationDataset):
    """ADE20K SceneParsing (``ADEChallengeData2016``): ``images/<split>/*.jpg`` with
    ``annotations/<split>/*.png``; annotation value v in 1..150 is class v - 1, and 0 ("other objects")
    becomes ``ignore_index`` (mmseg's ``reduce_zero_label``). Splits ``training`` and ``validation``
    (``train`` and ``val`` accepted)."""
    layout = 'ade20k'
    label_kind = 'class'
    class_names = ADE20K_CLASSES
    SPLITS = {'train': 'training', 'val': 'validation'}

    def __init__(self, root: str, split: str = 'validation', ignore_index: Optional[int] = 255):
        split = self.SPLITS.get(split, split)
        names = _split_jpegs(os.path.join(root, 'images'), split, 'ADE20K')
        if ignore_index is None:
            raise DatasetError('ignore_index=None: ADE20K needs an ignore label for its "other objects" (value 0)')
        super().__init__(root, names, split, ignore_index)
        _require_pairs(self, 'image', self.image_path, 'annotation PNG', self.label_path)

    def image_path(self, name: str) -> str:
        return os.path.join(self.root, 'images', self.split, f'{name}.jpg')

    def label_path(self, name: str) -> str:
        return os.path.join(self.root, 'annotations', self.split, f'{name}.png')

    def read_ground_truths(self, name: str) -> List[np.ndarray]:
        label = _read_label_png(self.label_path(name))
        return [np.where(label == 0, self.ignore_index, label - 1)]


class LabelFolder(SegmentationDataset):
    """A plain folder: ``images/<name>.<ext>`` with same-named ``labels/<name>.png``."""
    layout = 'folder'
    label_kind = 'class'

    def __init__(self, root: str, ignore_index: Optional[int] = 255):
        files = {}
        for f in sorted(_listdir(os.path.join(root, 'images'))):
            stem, ext = os.path.splitext(f)
            if ext.lower() in IMAGE_EXTENSIONS:
                if stem in files:
                    raise DatasetError(f'{os.path.join(root, "images")}: two images named {stem!r} '
                                       f'({files[stem]} and {f}); names must be unique')
                files[stem] = f
        if not files:
            raise DatasetError(f'{os.path.join(root, "images")} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
        self._files = files
        super().__init__(root, sorted(files), None, ignore_index)
        _require_pairs(self, 'image', self.image_path, 'label PNG', self.label_path)

    def image_path(self, name: str) -> str:
        return os.path.join(self.root, 'images', self._files[name])

    def label_path(self, name: str) -> str:
        return os.path.join(self.root, 'labels', f'{name}.png')


LAYOUTS = {
    'voc': ('Pascal VOC 2012', 'JPEGImages/<id>.jpg, SegmentationClass/<id>.png and '
                               'ImageSets/Segmentation/<split>.txt'),
    'bsds': ('BSDS500', 'images/<split>/<id>.jpg and groundTruth/<split>/<id>.mat'),
    'cityscapes': ('Cityscapes', 'leftImg8bit/<split>/<city>/*_leftImg8bit.png and '
                                 'gtFine/<split>/<city>/*_gtFine_labelTrainIds.png (or _labelIds.png)'),
    'ade20k': ('ADE20K (ADEChallengeData2016)', 'images/<split>/*.jpg and annotations/<split>/*.png'),
    'folder': ('plain folder', 'images/<name>.<jpg|jpeg|png|bmp|tif|tiff> and labels/<name>.png'),
}
# The folders that identify each layout, and where under the root they may sit.
_MARKERS = {
    'voc': ('JPEGImages', 'SegmentationClass'),
    'bsds': ('images', 'groundTruth'),
    'cityscapes': ('leftImg8bit', 'gtFine'),
    'ade20k': ('images', 'annotations'),
    'folder': ('images', 'labels'),
}
_DEFAULT_SPLITS = {'voc': 'val', 'bsds': 'test', 'cityscapes': 'val', 'ade20k': 'validation'}


def _detect(root: str) -> Optional[tuple]:
    """(layout, folder) of the first layout whose marker folders exist under root or a known sub-folder."""
    candidates = {
        'voc': (root, os.path.join(root, 'VOC2012')),
        'bsds': (root, os.path.join(root, 'data'), os.path.join(root, 'BSDS500', 'data')),
        'cityscapes': (root, os.path.join(root, 'cityscapes')),
        'ade20k': (root, os.path.join(root, 'ADEChallengeData2016')),
        'folder': (root,),
    }
    for layout, dirs in _MARKERS.items():
        for folder in candidates[layout]:
            if all(os.path.isdir(os.path.join(folder, d)) for d in dirs):
                return layout, folder
    return None


def open_dataset(root: str, layout: str = 'auto', split: Optional[str] = None,
                 ignore_index: Optional[int] = 255) -> SegmentationDataset:
    """Open a segmentation dataset folder in one of :data:`LAYOUTS`.

    Args:
        root: The dataset folder.
        layout: 'auto' (detect), 'voc', 'bsds', 'cityscapes', 'ade20k' or 'folder'.
        split: Split to read: VOC 'val' (default) or 'train'/'trainval'; BSDS500 'test' (default), 'val'
            or 'train'; Cityscapes 'val' (default), 'train' or 'test'; ADE20K 'validation' (default, or
            'val'), 'training' (or 'train'); must be None for a plain folder.
        ignore_index: Label of pixels to skip for 'voc', 'cityscapes', 'ade20k' and 'folder' (None: none;
            ADE20K needs one). BSDS500 has none.

    Raises:
        DatasetError: The folder is in none of the layouts (the message lists the files each expects),
            a split is missing, or images lack labels.
    """
    if layout not in ('auto', *LAYOUTS):
        raise DatasetError(f'layout must be one of auto, {", ".join(LAYOUTS)}; got {layout!r}')
    if not os.path.isdir(root):
        raise DatasetError(f'dataset folder {root!r} does not exist or is not a folder')
    found = _detect(root)
    if layout == 'auto':
        if found is None:
            expected = '\n'.join(f'  {k:7s}({name}): {files}' for k, (name, files) in LAYOUTS.items())
            entries = sorted(_listdir(root))
            shown = ', '.join(e + ('/' if os.path.isdir(os.path.join(root, e)) else '') for e in entries[:12])
            more = f', ... ({len(entries)} entries)' if len(entries) > 12 else ''
            raise DatasetError(
                f'dataset folder {root!r} is in none of the supported layouts; expected one of:\n{expected}\n'
                f'It holds: {shown or "nothing"}{more}')
        layout, folder = found
    else:
        folder = found[1] if found is not None and found[0] == layout else root
        name, files = LAYOUTS[layout]
        markers = _MARKERS[layout]
        missing = [d for d in markers if not os.path.isdir(os.path.join(folder, d))]
        if missing:
            raise DatasetError(f'dataset folder {root!r} is not in the {layout} layout ({name}: {files}): '
                               f'missing {", ".join(m + "/" for m in missing)}')
    if layout == 'voc':
        return VOCSegmentation(folder, split or _DEFAULT_SPLITS[layout], ignore_index)
    if layout == 'bsds':
        return BSDS500(folder, split or _DEFAULT_SPLITS[layout])
    if layout == 'cityscapes':
        return Cityscapes(folder, split or _DEFAULT_SPLITS[layout], ignore_index)
    if layout == 'ade20k':
        return ADE20K(folder, split or _DEFAULT_SPLITS[layout], ignore_index)
    if split is not None:
        raise DatasetError(f'split={split!r}: the plain folder layout has no splits (got folder {folder!r})')
    return LabelFolder(folder, ignore_index)


def _listdir(path: str) -> List[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _stems(folder: str, extensions: Sequence[str]) -> List[str]:
    return sorted(os.path.splitext(f)[0] for f in _listdir(folder) if os.path.splitext(f)[1].lower() in extensions)


def _split_folder(parent: str, split: str, dataset: str) -> str:
    """``parent/split``, which must be a folder: else the error lists the splits ``parent`` holds."""
    folder = os.path.join(parent, split)
    if not os.path.isdir(folder):
        have = sorted(d for d in _listdir(parent) if os.path.isdir(os.path.join(parent, d)))
        raise DatasetError(f'{dataset} split folder {folder} not found (split {split!r}); '
                           f'splits in this folder: {", ".join(have) or "none"}')
    return folder


def _split_jpegs(parent: str, split: str, dataset: str) -> List[str]:
    """The ids of the ``.jpg`` images in ``parent/split`` (at least one)."""
    folder = _split_folder(parent, split, dataset)
    names = _stems(folder, ('.jpg',))
    if not names:
        raise DatasetError(f'{dataset} split folder {folder} holds no .jpg images')
    return names


def _require_pairs(dataset: SegmentationDataset, image_kind: str, image_path, label_kind: str, label_path) -> None:
    """Every image id must have both files; name the first few that do not."""
    for kind, path_of in ((image_kind, image_path), (label_kind, label_path)):
        missing = [dataset.names[i] for i in range(len(dataset)) if not os.path.isfile(path_of(dataset.names[i]))]
        if missing:
            first = ', '.join(path_of(n) for n in missing[:3])
            raise DatasetError(
                f'{len(missing)} of {len(dataset)} images in {dataset.root!r} ({dataset.layout} layout) have no '
                f'{kind}: expected {first}{", ..." if len(missing) > 3 else ""}')


def read_image(path: str) -> np.ndarray:
    """The image file at ``path`` as a (H, W, 3) uint8 RGB array: :func:`spformer.images.read_rgb`
    (any PIL mode without clipping: 16-bit images scaled by their full range).

    Raises:
        ImageReadError: The file cannot be read (the message names it and says why).
    """
    return read_rgb(path)


def _read_label_png(path: str) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        if im.mode not in ('1', 'P', 'L', 'I', 'I;16', 'I;16B', 'I;16L'):
            raise DatasetError(
                f'{path}: label PNG has mode {im.mode!r}; expected one channel of label ids (palette "P", '
                f'8-bit "L" or 16-bit grey), not colours')
        return np.asarray(im).astype(np.int64)


# The Pascal VOC colour map (bit-interleaved class index), as in the VOC devkit's labelcolormap.m.
def voc_palette() -> List[int]:
    """The 256-entry Pascal VOC palette, flattened RGB (for ``PIL.Image.putpalette``)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def write_shapes_dataset(root: str, layout: str = 'folder', num_images: int = 4, size: Sequence[int] = (120, 160),
                         seed: int = 0, void_width: int = 2) -> str:
    """Write images of a few flat or textured shapes on a textured background, with exact label maps.

    Each image holds 3-5 shapes (discs, ellipses, rectangles, triangles) of random classes 1..20 over
    a background of class 0; each region has its own colour, and about half of them carry stripes
    or noise (amplitude at most 24 grey levels; neighbouring regions differ by at least 60). The label
    maps are the drawn shapes themselves.

    Args:
        root: Folder to create (it may exist).
        layout: 'voc' (JPEG images, palette PNG classes, a ``void_width``-pixel 255 band inside every
            region's border as in VOC, splits val and train), 'bsds' (JPEG images, split test; two
            "humans": one segment per shape, and one that merges the last shape into the background)
            or 'folder' (PNG images and 8-bit label PNGs).
        num_images: How many images.
        size: (H, W) of the images.
        seed: Random seed.
        void_width: Width of the VOC ignore band (0: none).

    Returns:
        ``root``.
    """
    from PIL import Image
    from skimage.draw import disk, ellipse, polygon, rectangle
    from spformer.eval.metrics import boundary_map

    if layout not in ('voc', 'bsds', 'folder'):
        raise DatasetError(f"layout must be one of voc, bsds, folder (the layouts it writes); got {layout!r}")
    H, W = size
    rng = np.random.default_rng(seed)
    dirs = {'voc': ('JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')),
            'bsds': (os.path.join('images', 'test'), os.path.join('groundTruth', 'test')),
            'folder': ('images', 'labels')}[layout]
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    names = []
    for n in range(num_images):
        name = f'shapes_{n:03d}'
        names.append(name)
        instances = np.zeros((H, W), np.int64)  # 0 = background, k = k-th shape
        for k in range(1, int(rng.integers(3, 6)) + 1):
            cy, cx = rng.uniform(0.2, 0.8) * H, rng.uniform(0.2, 0.8) * W
            r = rng.uniform(0.12, 0.3) * min(H, W)
            kind = rng.integers(4)
            if kind == 0:
                rr, cc = disk((cy, cx), r, shape=(H, W))
            elif kind == 1:
                rr, cc = ellipse(cy, cx, r, r * rng.uniform(1.3, 2.0), shape=(H, W), rotation=rng.uniform(0, np.pi))
            elif kind == 2:
                rr, cc = rectangle((cy - r, cx - 1.4 * r), (cy + r, cx + 1.4 * r), shape=(H, W))
                rr, cc = rr.astype(int), cc.astype(int)
            else:
                angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2.1, 4.2])
                rr, cc = polygon(cy + 1.5 * r * np.sin(angles), cx + 1.5 * r * np.cos(angles), shape=(H, W))
            instances[rr, cc] = k
        ids = np.unique(instances)
        instances = np.searchsorted(ids, instances)  # shapes hidden by later ones are gone: 0..n-1
        count = len(ids)
        colours = _distinct_colours(rng, count)
        image = colours[instances].astype(np.float64)
        yy, xx = np.mgrid[0:H, 0:W]
        for k in range(count):
            texture = rng.integers(3)
            if texture == 1:  # stripes
                period, angle = rng.uniform(4, 10), rng.uniform(0, np.pi)
                wave = 24 * (np.sin(2 * np.pi * (yy * np.sin(angle) + xx * np.cos(angle)) / period) > 0) - 12
            elif texture == 2:  # noise
                wave = rng.uniform(-12, 12, (H, W))
            else:
                continue
            image[instances == k] += wave[instances == k][:, None]
        image = image.clip(0, 255).astype(np.uint8)
        classes = np.concatenate([[0], rng.choice(np.arange(1, 21), count - 1, replace=False)])
        semantic = classes[instances]

        if layout == 'voc':
            Image.fromarray(image).save(os.path.join(root, 'JPEGImages', f'{name}.jpg'), quality=95)
            label = semantic.copy()
            if void_width:
                from scipy.ndimage import minimum_filter
                # VOC marks object outlines void: pixels within void_width of another region.
                inner = minimum_filter(~boundary_map(instances), size=2 * void_width - 1, mode='nearest')
                label[~inner] = 255
            png = Image.fromarray(label.astype(np.uint8), mode='P')
            png.putpalette(voc_palette())
            png.save(os.path.join(root, 'SegmentationClass', f'{name}.png'))
        elif layout == 'bsds':
            import scipy.io
            Image.fromarray(image).save(os.path.join(root, 'images', 'test', f'{name}.jpg'), quality=95)
            coarse = np.where(instances == count - 1, 0, instances)
            humans = np.empty((1, 2), dtype=object)
            for h, seg in enumerate((instances, coarse)):
                humans[0, h] = {'Segmentation': (seg + 1).astype(np.uint16), 'Boundaries': boundary_map(seg)}
            scipy.io.savemat(os.path.join(root, 'groundTruth', 'test', f'{name}.mat'), {'groundTruth': humans})
        else:
            Image.fromarray(image).save(os.path.join(root, 'images', f'{name}.png'))
            Image.fromarray(semantic.astype(np.uint8), mode='L').save(os.path.join(root, 'labels', f'{name}.png'))
    if layout == 'voc':
        for split, part in (('val', names), ('train', names[:1])):
            with open(os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt'), 'w') as f:
                f.write(''.join(f'{n}\n' for n in part))
    return root


def _distinct_colours(rng: np.random.Generator, count: int, min_distance: float = 60.0) -> np.ndarray:
    """``count`` RGB colours in [40, 215], pairwise at least ``min_distance`` apart (Euclidean)."""
    colours = []
    while len(colours) < count:
        c = rng.uniform(40, 215, 3)
        if all(np.linalg.norm(c - o) >= min_distance for o in colours):
            colours.append(c)
    return np.array(colours)
