"""spformer.eval.datasets: every reader against files this test writes itself, with known contents.

Oracles are independent of the code under test:
- the label arrays a test wrote (with PIL or scipy.io.savemat, in the structures the real datasets
  use: VOC palette PNGs, BSDS500 ``groundTruth`` 1xN cell arrays of structs with ``Segmentation`` and
  ``Boundaries``) must read back value for value, in both orientations (the maps are not square);
- which image belongs to which label is encoded in the image's colour, written here;
- dataset scores must equal the brute-force reference metrics of tests/test_metrics.py on the
  arrays written here: averaged over a BSDS500 image's humans, with VOC's 255 ignored, and one
  confusion pooled over a class dataset;
- for :func:`write_shapes_dataset`, the layouts must agree with each other (same seed, same shapes)
  and the VOC void band must be exactly the pixels within ``void_width - 1`` (Chebyshev) of a
  boundary pixel of the folder layout's labels (reference boundary map).
"""
import math
import os

import numpy as np
import pytest
from PIL import Image

from spformer.eval.datasets import (
    BSDS500, DatasetError, LabelFolder, VOCSegmentation, open_dataset, voc_palette, write_shapes_dataset)
from spformer.eval import Segmentation, Segmenter, evaluate
from test_metrics import (
    ref_asa, ref_boundary_map, ref_boundary_recall, ref_miou_macc, ref_oracle_confusion, ref_ue)

H, W = 6, 9  # not square: a transposed map cannot pass for the right one


class _Fixed(Segmenter):
    """The same segment map for every image (the metrics then depend on the ground truth alone)."""
    name = 'fixed'

    def __init__(self, labels):
        self.labels = np.asarray(labels, np.int64)

    def __call__(self, images):
        return Segmentation(np.broadcast_to(self.labels, images.shape[:3]).copy())


# A 2x3 grid of 3x3 cells.
GRID = (np.arange(H)[:, None] // 3) * 3 + np.arange(W)[None, :] // 3


def _flat_image(colour, size=(H, W)):
    return np.broadcast_to(np.array(colour, np.uint8), (*size, 3)).copy()


def _nanmean(values):
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else math.nan


# ---------------------------------------------------------------------------------------------
# BSDS500: several humans per image, every one read and scored
# ---------------------------------------------------------------------------------------------

def _write_bsds_mat(path, humans):
    """A BSDS500 groundTruth file: a 1xN MATLAB cell array of structs (Segmentation, Boundaries)."""
    import scipy.io
    cell = np.empty((1, len(humans)), dtype=object)
    for k, seg in enumerate(humans):
        cell[0, k] = {'Segmentation': np.asarray(seg, np.uint16), 'Boundaries': ref_boundary_map(seg)}
    scipy.io.savemat(str(path), {'groundTruth': cell})


def _bsds_humans():
    left_right = np.where(np.arange(W)[None, :] < 4, 1, 2).repeat(H, 0)
    top_bottom = np.ones((H, W), np.int64)
    top_bottom[2:, :6] = 2
    top_bottom[2:, 6:] = 300  # ids above 255: BSDS stores uint16
    one_region = np.full((H, W), 5)  # no boundary: boundary recall undefined for this human
    corner = np.ones((H, W), np.int64)
    corner[:2, -2:] = 2
    return {'img_a': [left_right, top_bottom, one_region], 'img_b': [corner]}  # img_b: one human only


def _write_bsds(root, split='test'):
    humans = _bsds_humans()
    os.makedirs(root / 'images' / split)
    os.makedirs(root / 'groundTruth' / split)
    for i, (name, segs) in enumerate(humans.items()):
        Image.fromarray(_flat_image((40 + 100 * i, 90, 200))).save(root / 'images' / split / f'{name}.jpg')
        _write_bsds_mat(root / 'groundTruth' / split / f'{name}.mat', segs)
    return humans


def test_bsds_reads_every_human_value_for_value(tmp_path):
    humans = _write_bsds(tmp_path / 'BSDS500' / 'data')
    ds = open_dataset(str(tmp_path))  # BSR-like root: BSDS500/data below it
    assert isinstance(ds, BSDS500) and ds.layout == 'bsds' and ds.split == 'test'
    assert ds.root == str(tmp_path / 'BSDS500' / 'data')
    assert ds.names == ['img_a', 'img_b'] and ds.ignore_index is None and ds.label_kind == 'segment'
    for i, name in enumerate(ds.names):
        sample = ds[i]
        assert sample.name == name and sample.image.shape == (H, W, 3)
        assert len(sample.ground_truths) == len(humans[name])  # all humans, the 1x1 cell too
        for got, written in zip(sample.ground_truths, humans[name]):
            assert got.shape == (H, W) and np.issubdtype(got.dtype, np.integer)
            assert np.array_equal(got, written)  # ids as stored (from 1, up to 300), not shifted


def test_bsds_scores_are_averaged_over_the_humans(tmp_path):
    humans = _write_bsds(tmp_path)
    ds = open_dataset(str(tmp_path), 'bsds')
    result = evaluate(ds, [_Fixed(GRID)], input_size=(H, W), tolerance=1, progress=False)
    rows = {r['image']: r for r in result.per_image}
    for name, segs in humans.items():
        # The reference scores of every human, averaged (boundary recall: over the humans that have a
        # boundary; mIoU/mAcc per human, BSDS ids not being classes).
        per_human = [dict(asa=ref_asa(GRID, h, None), ue=ref_ue(GRID, h, None),
                          br=ref_boundary_recall(GRID, h, 1, None),
                          iou=ref_miou_macc(ref_oracle_confusion(GRID, h, None))) for h in segs]
        row = rows[name]
        assert row['asa'] == pytest.approx(np.mean([p['asa'] for p in per_human]))
        assert row['undersegmentation_error'] == pytest.approx(np.mean([p['ue'] for p in per_human]))
        assert row['boundary_recall'] == pytest.approx(_nanmean([p['br'] for p in per_human]))
        assert row['miou'] == pytest.approx(np.mean([p['iou'][0] for p in per_human]))
        assert row['macc'] == pytest.approx(np.mean([p['iou'][1] for p in per_human]))
    # The humans really disagree: a reader keeping one of them would score img_a otherwise.
    for metric in (ref_asa, ref_ue):
        scores = [metric(GRID, h, None) for h in humans['img_a']]
        assert len(set(scores)) == 3 and scores[0] != pytest.approx(np.mean(scores))
    summary = result.summary[0]
    assert summary['asa'] == pytest.approx(np.mean([rows[n]['asa'] for n in humans]))
    assert summary['miou'] == pytest.approx(np.mean([rows[n]['miou'] for n in humans]))


def test_bsds_split_and_errors(tmp_path):
    _write_bsds(tmp_path, split='val')
    assert open_dataset(str(tmp_path), split='val').names == ['img_a', 'img_b']
    with pytest.raises(DatasetError, match=r"split 'test'.*splits in this folder: val"):
        open_dataset(str(tmp_path))
    import scipy.io
    scipy.io.savemat(str(tmp_path / 'groundTruth' / 'val' / 'img_b.mat'), {'other': np.zeros(2)})
    with pytest.raises(DatasetError, match=r'img_b.mat: no "groundTruth" variable \(it has: other\)'):
        open_dataset(str(tmp_path), split='val')[1]


# ---------------------------------------------------------------------------------------------
# Pascal VOC: palette PNGs are indices, 255 is ignored, the split file decides
# ---------------------------------------------------------------------------------------------

# The VOC devkit colours of the classes used (labelcolormap.m): their grey levels are not the indices.
VOC_COLOURS = {0: (0, 0, 0), 1: (128, 0, 0), 15: (192, 128, 128), 20: (0, 64, 128), 255: (224, 224, 192)}


def test_voc_palette_is_the_devkit_colour_map():
    palette = np.array(voc_palette()).reshape(256, 3)
    for index, colour in VOC_COLOURS.items():
        assert tuple(palette[index]) == colour, index


def _voc_labels():
    a = np.zeros((H, W), np.int64)
    a[1:5, 2:7] = 15
    a[0, :] = 1
    a[1, 2:7] = 255  # a void band on a horizontal boundary
    a[1:5, 1] = 255  # and on a vertical one
    b = np.full((H, W), 20)
    b[:, :3] = 0
    b[4:, :] = 255
    return {'a': a, 'b': b}


def _write_palette_png(path, labels):
    png = Image.fromarray(labels.astype(np.uint8), mode='P')
    palette = [0] * 768
    for index, colour in VOC_COLOURS.items():
        palette[3 * index:3 * index + 3] = colour
    png.putpalette(palette)
    png.save(path)
    with Image.open(path) as im:  # what the reader gets: a palette image whose grey levels are not the ids
        assert im.mode == 'P'
        grey = np.asarray(im.convert('L'))
    assert not np.array_equal(grey, labels)


IMAGE_COLOURS = {'a': (220, 30, 30), 'b': (30, 30, 220), 'c': (30, 200, 30), 'd': (200, 200, 40),
                 'a-1': (120, 40, 160)}


def _write_voc(root):
    labels = _voc_labels()
    for d in ('JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')):
        os.makedirs(root / d)
    for name, label in labels.items():
        Image.fromarray(_flat_image(IMAGE_COLOURS[name])).save(root / 'JPEGImages' / f'{name}.jpg', quality=95)
        _write_palette_png(root / 'SegmentationClass' / f'{name}.png', label)
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('b\na\n')  # not sorted: file order is kept
    (root / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('a\n')
    return labels


def _colour_of(image):
    return tuple(int(round(v)) for v in image.reshape(-1, 3).mean(0))


def _is_colour(image, colour, tolerance=12):
    return max(abs(a - b) for a, b in zip(_colour_of(image), colour)) <= tolerance


def test_voc_reads_palette_indices_and_the_split_file(tmp_path):
    labels = _write_voc(tmp_path / 'VOCdevkit' / 'VOC2012')
    ds = open_dataset(str(tmp_path / 'VOCdevkit'))  # the devkit root: VOC2012 below it
    assert isinstance(ds, VOCSegmentation) and ds.split == 'val' and ds.ignore_index == 255
    assert ds.root == str(tmp_path / 'VOCdevkit' / 'VOC2012')
    assert ds.names == ['b', 'a']
    for i, name in enumerate(ds.names):
        sample = ds[i]
        [gt] = sample.ground_truths
        assert np.array_equal(gt, labels[name]), name  # indices, not the palette colours' grey levels
        assert _is_colour(sample.image, IMAGE_COLOURS[name]), (name, _colour_of(sample.image))
    train = open_dataset(str(tmp_path / 'VOCdevkit'), split='train')
    assert train.names == ['a'] and np.array_equal(train[0].ground_truths[0], labels['a'])
    with pytest.raises(DatasetError, match=r"split 'test'.*splits in this folder: train, val"):
        open_dataset(str(tmp_path / 'VOCdevkit'), split='test')


def test_voc_scores_ignore_255_and_pool_one_confusion(tmp_path):
    labels = _write_voc(tmp_path)
    seg = GRID
    result = evaluate(open_dataset(str(tmp_path)), [_Fixed(seg)], input_size=(H, W), tolerance=0, progress=False)
    rows = {r['image']: r for r in result.per_image}
    pooled = {}
    for name, label in labels.items():
        assert rows[name]['asa'] == pytest.approx(ref_asa(seg, label, 255))
        assert rows[name]['undersegmentation_error'] == pytest.approx(ref_ue(seg, label, 255))
        assert rows[name]['boundary_recall'] == pytest.approx(ref_boundary_recall(seg, label, 0, 255))
        for key, n in ref_oracle_confusion(seg, label, 255).items():
            pooled[key] = pooled.get(key, 0) + n
        # 255 really matters here: scored as a region, the values differ.
        assert ref_asa(seg, label, None) != pytest.approx(ref_asa(seg, label, 255))
    miou, macc = ref_miou_macc(pooled)
    assert result.summary[0]['miou'] == pytest.approx(miou) and result.summary[0]['macc'] == pytest.approx(macc)
    assert 255 not in {t for t, _ in pooled}


# ---------------------------------------------------------------------------------------------
# Plain folder: any image format, palette / 8-bit / 16-bit label PNGs
# ---------------------------------------------------------------------------------------------

def _write_folder(root):
    os.makedirs(root / 'images')
    os.makedirs(root / 'labels')
    base = np.zeros((H, W), np.int64)
    base[:, 5:] = 1
    base[4:, :] = 2
    labels = {
        'a': np.where(base == 2, 255, base),       # 8-bit grey 'L' with 255 (ignore)
        'b': np.array([0, 1, 15, 20])[base],       # palette 'P': colours whose grey levels are not the ids
        'c': np.array([7, 1000, 65535])[base],     # 16-bit grey: ids above 255
        'd': base[:, ::-1].copy(),                 # 'L', mirrored
        'a-1': base[::-1].copy(),                  # 'L', upside down; 'a-1.png' sorts before 'a.png'
    }
    Image.fromarray(labels['a'].astype(np.uint8), 'L').save(root / 'labels' / 'a.png')
    _write_palette_png(root / 'labels' / 'b.png', labels['b'])
    Image.fromarray(labels['c'].astype(np.uint16)).save(root / 'labels' / 'c.png')
    with Image.open(root / 'labels' / 'c.png') as im:
        assert im.mode == 'I;16'
    for name in ('d', 'a-1'):
        Image.fromarray(labels[name].astype(np.uint8), 'L').save(root / 'labels' / f'{name}.png')
    # Images in four formats, each in its own colour; c is a 16-bit grey image (v * 257 reads as v).
    Image.fromarray(_flat_image(IMAGE_COLOURS['a'])).save(root / 'images' / 'a.png')
    Image.fromarray(_flat_image(IMAGE_COLOURS['b'])).save(root / 'images' / 'b.bmp')
    Image.fromarray(np.full((H, W), 150 * 257, np.uint16)).save(root / 'images' / 'c.tif')
    Image.fromarray(_flat_image(IMAGE_COLOURS['d'])).save(root / 'images' / 'd.jpg', quality=95)
    Image.fromarray(_flat_image(IMAGE_COLOURS['a-1'])).save(root / 'images' / 'a-1.png')
    return labels


def test_folder_reads_8bit_palette_and_16bit_labels(tmp_path):
    labels = _write_folder(tmp_path)
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, LabelFolder) and ds.split is None and ds.ignore_index == 255
    assert ds.names == ['a', 'a-1', 'b', 'c', 'd']  # by name; the file names sort otherwise ('a-1.png' < 'a.png')
    colours = dict(IMAGE_COLOURS, c=(150, 150, 150))
    for i, name in enumerate(ds.names):
        sample = ds[i]
        assert sample.name == name
        [gt] = sample.ground_truths
        assert np.array_equal(gt, labels[name]), name
        # the image read is the one of the same name (its own colour), not another's
        assert _is_colour(sample.image, colours[name], tolerance=0 if name != 'd' else 12), name
    assert np.array_equal(ds[ds.names.index('c')].image, _flat_image((150, 150, 150)))  # 16-bit scaled, not clipped

    # Scores: 255 ignored (a), ids above 255 are ordinary classes (c).
    result = evaluate(ds, [_Fixed(GRID)], input_size=(H, W), progress=False)
    rows = {r['image']: r for r in result.per_image}
    for name, label in labels.items():
        assert rows[name]['asa'] == pytest.approx(ref_asa(GRID, label, 255)), name
        assert rows[name]['boundary_recall'] == pytest.approx(ref_boundary_recall(GRID, label, 2, 255)), name


def test_folder_refuses_rgb_labels_wrong_sizes_and_missing_labels(tmp_path):
    _write_folder(tmp_path)
    Image.fromarray(_flat_image((1, 2, 3))).save(tmp_path / 'labels' / 'b.png')
    with pytest.raises(DatasetError, match=r"b.png: label PNG has mode 'RGB'; expected one channel"):
        open_dataset(str(tmp_path))[2]
    Image.fromarray(np.zeros((W, H), np.uint8)).save(tmp_path / 'labels' / 'b.png')  # transposed size
    with pytest.raises(DatasetError, match=rf'b.png: label map is {H}x{W} \(WxH\) but the image .*b.bmp is {W}x{H}'):
        open_dataset(str(tmp_path))[2]
    os.remove(tmp_path / 'labels' / 'b.png')
    with pytest.raises(DatasetError, match='1 of 5 images .* have no label PNG'):
        open_dataset(str(tmp_path))
    with pytest.raises(DatasetError, match='the plain folder layout has no splits'):
        open_dataset(str(tmp_path), split='val')


# ---------------------------------------------------------------------------------------------
# write_shapes_dataset: the three layouts describe the same shapes
# ---------------------------------------------------------------------------------------------

def test_shapes_dataset_layouts_agree(tmp_path):
    size, void = (40, 56), 2
    roots = {layout: write_shapes_dataset(str(tmp_path / layout), layout, num_images=2, size=size, seed=3,
                                          void_width=void) for layout in ('folder', 'voc', 'bsds')}
    ds = {layout: open_dataset(root) for layout, root in roots.items()}
    assert [d.layout for d in ds.values()] == ['folder', 'voc', 'bsds']
    assert ds['folder'].names == ds['voc'].names == ds['bsds'].names == ['shapes_000', 'shapes_001']
    assert open_dataset(roots['voc'], split='train').names == ['shapes_000']
    r = void - 1
    for i in range(2):
        folder, voc, bsds = ds['folder'][i], ds['voc'][i], ds['bsds'][i]
        [label] = folder.ground_truths
        assert label.shape == size and set(np.unique(label)) <= set(range(21)) and 0 in label
        # The same pictures (JPEG-lossy in voc/bsds): not transposed, not another image.
        for other in (voc, bsds):
            assert np.abs(other.image.astype(int) - folder.image).mean() < 6
        # VOC: the folder's classes, with 255 exactly on the pixels within r of a boundary pixel.
        [voc_label] = voc.ground_truths
        b = ref_boundary_map(label)
        near = np.zeros(size, bool)
        for y, x in zip(*np.nonzero(b)):
            near[max(0, y - r):y + r + 1, max(0, x - r):x + r + 1] = True
        assert np.array_equal(voc_label == 255, near)
        assert np.array_equal(voc_label[~near], label[~near])
        # BSDS: two humans; the first is the folder's partition with ids from 1, the second merges the
        # last shape (the largest id) into the background (id 1).
        first, second = bsds.ground_truths
        assert first.min() == 1
        pairs = set(zip(label.ravel().tolist(), first.ravel().tolist()))
        assert len(pairs) == len(np.unique(label)) == len(np.unique(first))  # a one-to-one relabelling
        assert np.array_equal(second, np.where(first == first.max(), 1, first))
        assert len(np.unique(second)) == len(np.unique(first)) - 1


# ---------------------------------------------------------------------------------------------
# Cityscapes and ADE20K: the training layouts of the segmentation models
# ---------------------------------------------------------------------------------------------

def _write_png(path, array, mode):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(array, np.uint8), mode=mode).save(path)


def _cityscapes(root, split='val', train_ids=True):
    """Two cities, one image each; the image's colour encodes its id. Label ids -> train ids by hand from
    cityscapesscripts' table: 0 (unlabeled) -> 255, 7 road -> 0, 8 sidewalk -> 1, 9 parking -> 255,
    26 car -> 13, 33 bicycle -> 18."""
    label_ids = np.array([[0, 7, 8, 9, 26, 33, 7, 7, 7]] * H)
    train = np.array([[255, 0, 1, 255, 13, 18, 0, 0, 0]] * H)
    for k, (city, frame) in enumerate((('aachen', 'aachen_000000_000019'), ('bremen', 'bremen_000001_000019'))):
        _write_png(os.path.join(root, 'leftImg8bit', split, city, f'{frame}_leftImg8bit.png'),
                   _flat_image((10 * k, 0, 0)), 'RGB')
        gt = os.path.join(root, 'gtFine', split, city, f'{frame}_gtFine_')
        _write_png(gt + 'labelIds.png', label_ids, 'L')
        if train_ids:
            _write_png(gt + 'labelTrainIds.png', train, 'L')
    return train


def test_cityscapes_reads_train_ids_or_maps_label_ids(tmp_path):
    for train_ids in (True, False):
        root = tmp_path / f'cs_{train_ids}'
        expected = _cityscapes(str(root), train_ids=train_ids)
        ds = open_dataset(str(root))  # detected
        assert ds.layout == 'cityscapes' and ds.split == 'val' and len(ds) == 2
        assert ds.names == ['aachen/aachen_000000_000019', 'bremen/bremen_000001_000019']
        for k, sample in enumerate(ds):
            assert sample.image[0, 0, 0] == 10 * k
            [gt] = sample.ground_truths
            np.testing.assert_array_equal(gt, expected)
        assert ds.label_path(ds.names[0]).endswith('labelTrainIds.png' if train_ids else 'labelIds.png')
    assert len(ds.class_names) == 19 and ds.class_names[0] == 'road' and ds.class_names[18] == 'bicycle'


def test_cityscapes_train_ids_file_is_read_as_written(tmp_path):
    # a labelTrainIds file wins over the labelIds file, even where they disagree
    _cityscapes(str(tmp_path))
    odd = np.arange(H * W).reshape(H, W) % 19
    _write_png(str(tmp_path / 'gtFine/val/aachen/aachen_000000_000019_gtFine_labelTrainIds.png'), odd, 'L')
    np.testing.assert_array_equal(open_dataset(str(tmp_path), 'cityscapes')[0].ground_truths[0], odd)


def test_cityscapes_errors_name_the_split_and_the_missing_label(tmp_path):
    _cityscapes(str(tmp_path), split='train')
    with pytest.raises(DatasetError, match=r"split 'val'\); splits in this folder: train"):
        open_dataset(str(tmp_path))
    os.remove(tmp_path / 'gtFine/train/bremen/bremen_000001_000019_gtFine_labelIds.png')
    os.remove(tmp_path / 'gtFine/train/bremen/bremen_000001_000019_gtFine_labelTrainIds.png')
    with pytest.raises(DatasetError, match='1 of 2 images .* have no gtFine labelTrainIds or labelIds PNG: expected '
                                           '.*bremen_000001_000019_gtFine_labelIds.png'):
        open_dataset(str(tmp_path), split='train')


def test_ade20k_shifts_classes_and_ignores_other(tmp_path):
    # annotation 0 ("other objects") -> 255; v -> v - 1: 1 wall -> 0, 150 flag -> 149
    root = tmp_path / 'ADEChallengeData2016'
    ann = np.array([[0, 1, 2, 150, 5, 0, 1, 1, 1]] * H)
    for split in ('training', 'validation'):
        Image.fromarray(_flat_image((7, 7, 7))).save(_mkdir(root / 'images' / split) / 'ADE_x_00000001.jpg')
        _write_png(str(root / 'annotations' / split / 'ADE_x_00000001.png'), ann, 'L')
    ds = open_dataset(str(tmp_path))  # the folder holding ADEChallengeData2016/
    assert (ds.layout, ds.split, ds.root) == ('ade20k', 'validation', str(root))
    np.testing.assert_array_equal(ds[0].ground_truths[0], np.array([[255, 0, 1, 149, 4, 255, 0, 0, 0]] * H))
    assert open_dataset(str(root), split='train').split == 'training'
    assert len(ds.class_names) == 150 and ds.class_names[0] == 'wall' and ds.class_names[149] == 'flag'
    assert open_dataset(str(root), ignore_index=100)[0].ground_truths[0][0, 0] == 100
    with pytest.raises(DatasetError, match='ignore_index=None'):
        open_dataset(str(root), 'ade20k', ignore_index=None)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
