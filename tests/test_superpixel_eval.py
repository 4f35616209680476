"""spformer.eval (metrics, datasets, segmenters, evaluation, cli): the metrics against values worked out by hand on
tiny label maps, the resolution policy, the three dataset layouts end to end through the CLI, the
errors for bad input, and spformer-visualize.

Expected metric values are computed here from the definitions (see each comment), never copied from
the code's output.
"""
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch
import timm

import spformer  # noqa: F401  (registers the models)
from spformer.eval.datasets import DatasetError, Sample, SegmentationDataset, open_dataset, write_shapes_dataset
from spformer.eval import (
    InputError, ModelSuperpixels, PatchGrid, Segmentation, Segmenter, achievable_segmentation_accuracy,
    boundary_recall, compactness, evaluate, mean_iou_and_accuracy, num_segments, oracle_confusion,
    resize_nearest, undersegmentation_error)
from spformer.eval.cli import main
from spformer.pictures import stage_labels
from spformer.visualize import main as visualize_main

TINY = 'spformer_tiny_sp16_224'


# ---------------------------------------------------------------------------------------------
# Metrics on hand-made label maps
# ---------------------------------------------------------------------------------------------

def test_perfect_segmentation():
    gt = np.array([[1, 1, 2, 2, 2, 3],
                   [1, 1, 2, 2, 2, 3],
                   [1, 1, 1, 3, 3, 3],
                   [1, 1, 1, 3, 3, 3]])
    segments = gt * 10 + 7  # same partition, other ids
    assert achievable_segmentation_accuracy(segments, gt) == 1.0
    assert boundary_recall(segments, gt, tolerance=0) == 1.0
    assert boundary_recall(segments, gt, tolerance=2) == 1.0
    assert undersegmentation_error(segments, gt) == 0.0
    assert mean_iou_and_accuracy(oracle_confusion(segments, gt)) == (1.0, 1.0)
    assert num_segments(segments) == 3


def test_one_segment_over_two_regions():
    # 4x8: label 1 in columns 0-4 (a = 20 px), label 2 in columns 5-7 (b = 12 px); one segment.
    gt = np.ones((4, 8), np.int64)
    gt[:, 5:] = 2
    segments = np.zeros_like(gt)
    # Neubert-Protzel: region 1 charges min(20, 12), region 2 charges min(12, 20): 2 * 12 / 32.
    assert undersegmentation_error(segments, gt) == pytest.approx(24 / 32)
    # ASA: the segment's best region has 20 of 32 pixels.
    assert achievable_segmentation_accuracy(segments, gt) == pytest.approx(20 / 32)
    # No segment boundary at all.
    assert boundary_recall(segments, gt, tolerance=2) == 0.0
    # Oracle: everything labelled 1. IoU_1 = 20 / (20 + 32 - 20), IoU_2 = 0; Acc_1 = 1, Acc_2 = 0.
    assert oracle_confusion(segments, gt) == Counter({(1, 1): 20, (2, 1): 12})
    miou, macc = mean_iou_and_accuracy(oracle_confusion(segments, gt))
    assert miou == pytest.approx((20 / 32 + 0) / 2)
    assert macc == pytest.approx(0.5)


def test_boundary_one_column_off():
    # Ground truth splits 4x4 between columns 1 and 2; the segments between columns 2 and 3.
    gt = np.zeros((4, 4), np.int64)
    gt[:, 2:] = 1
    segments = np.zeros((4, 4), np.int64)
    segments[:, 3:] = 1
    # Boundary pixels (both sides): ground truth columns 1 and 2 (8 px), segments columns 2 and 3.
    # Tolerance 0: only column 2 is hit (4 of 8); tolerance 1: column 1 is 1 px from column 2.
    assert boundary_recall(segments, gt, tolerance=0) == pytest.approx(0.5)
    assert boundary_recall(segments, gt, tolerance=1) == 1.0
    # Segment A (columns 0-2) holds 8 px of label 0 and 4 of label 1; segment B 4 px of label 1.
    assert achievable_segmentation_accuracy(segments, gt) == pytest.approx((8 + 4) / 16)
    # UE: A charges min(8, 4) for label 0 and min(4, 8) for label 1; B charges min(4, 0) = 0.
    assert undersegmentation_error(segments, gt) == pytest.approx(8 / 16)
    # Oracle: A -> 0, B -> 1. TP_0 = 8, TP_1 = 4, 4 px of label 1 predicted 0.
    # IoU_0 = 8 / (8 + 12 - 8), IoU_1 = 4 / (8 + 4 - 4); Acc_0 = 8 / 8, Acc_1 = 4 / 8.
    miou, macc = mean_iou_and_accuracy(oracle_confusion(segments, gt))
    assert miou == pytest.approx((8 / 12 + 4 / 8) / 2)
    assert macc == pytest.approx((1 + 0.5) / 2)


def test_ignore_label():
    # Column 2 is void (255): it counts nowhere, but the pixels beside it are boundary pixels.
    gt = np.array([[1, 1, 255, 2],
                   [1, 1, 255, 2]])
    segments = np.array([[0, 0, 0, 1],
                         [0, 0, 0, 1]])
    # Without the void pixels the segments are exact: 6 labelled pixels, all recoverable.
    assert achievable_segmentation_accuracy(segments, gt) == 1.0
    assert undersegmentation_error(segments, gt) == 0.0
    assert oracle_confusion(segments, gt) == Counter({(1, 1): 4, (2, 2): 2})
    # Ground-truth boundary pixels: columns 1 and 3 (4 px); segment boundary pixels: columns 2 and 3.
    assert boundary_recall(segments, gt, tolerance=0) == pytest.approx(0.5)
    assert boundary_recall(segments, gt, tolerance=1) == 1.0
    # With no ignore label, 255 is a region: segment 0 then holds 4 px of 1 and 2 of 255.
    assert achievable_segmentation_accuracy(segments, gt, ignore_index=None) == pytest.approx(6 / 8)
    # No ground-truth boundary at all: recall is undefined.
    assert math.isnan(boundary_recall(segments, np.ones((2, 4), np.int64)))


def test_compactness():
    # A square has Q = 4 pi k^2 / (4k)^2 = pi / 4; so does a grid of square cells.
    assert compactness(np.zeros((5, 5), np.int64)) == pytest.approx(math.pi / 4)
    grid = (np.arange(6)[:, None] // 3) * 2 + np.arange(6)[None, :] // 3
    assert compactness(grid) == pytest.approx(math.pi / 4)
    # 4x4: a 4x3 segment (area 12, perimeter 14) and a 4x1 one (area 4, perimeter 10).
    segments = np.zeros((4, 4), np.int64)
    segments[:, 3] = 1
    expected = 12 / 16 * 4 * math.pi * 12 / 14 ** 2 + 4 / 16 * 4 * math.pi * 4 / 10 ** 2
    assert compactness(segments) == pytest.approx(expected)


def test_mean_iou_and_accuracy_of_a_confusion():
    # Class 0: TP 6, FN 2 (as 1); class 1: TP 3, FP 2, FN 1 (as 2); class 2: FP 1, never true.
    confusion = {(0, 0): 6, (0, 1): 2, (1, 1): 3, (1, 2): 1}
    iou = [6 / (8 + 6 - 6), 3 / (4 + 5 - 3), 0 / (0 + 1 - 0)]
    acc = [6 / 8, 3 / 4]
    miou, macc = mean_iou_and_accuracy(confusion)
    assert miou == pytest.approx(sum(iou) / 3)
    assert macc == pytest.approx(sum(acc) / 2)


def test_resize_nearest_samples_pixel_centres():
    labels = np.arange(16).reshape(4, 4)
    # Output pixel i takes input pixel floor((i + 0.5) * 4 / 2): rows and columns 1 and 3.
    assert resize_nearest(labels, (2, 2)).tolist() == [[5, 7], [13, 15]]
    small = np.array([[1, 2], [3, 4]])
    assert resize_nearest(small, (4, 4)).tolist() == small.repeat(2, 0).repeat(2, 1).tolist()
    assert resize_nearest(small, (2, 2)) is small


def test_patch_grid():
    labels = PatchGrid(196)(np.zeros((1, 224, 224, 3), np.uint8)).labels[0]
    y, x = np.mgrid[0:224, 0:224]
    assert np.array_equal(labels, (y // 16) * 14 + x // 16)  # 16x16 cells
    with pytest.raises(InputError, match='square number'):
        PatchGrid(150)


# ---------------------------------------------------------------------------------------------
# Dataset-level aggregation
# ---------------------------------------------------------------------------------------------

class _Memory(SegmentationDataset):
    layout = 'memory'

    def __init__(self, maps, label_kind):
        super().__init__('memory', [f'im{i}' for i in range(len(maps))], None, 255)
        self.maps, self.label_kind = maps, label_kind

    def __getitem__(self, i):
        gts = self.maps[i]
        return Sample(self.names[i], np.zeros((*gts[0].shape, 3), np.uint8), [np.asarray(g) for g in gts])


class _OneSegment(Segmenter):
    name = 'one'

    def __call__(self, images):
        return Segmentation(np.zeros(images.shape[:3], np.int64))


def test_class_labels_pool_one_confusion_over_the_dataset():
    # Image 1 (2x2): all class 1. Image 2: three pixels of class 1, one of class 2; one segment each.
    ds = _Memory([[np.ones((2, 2))], [np.array([[1, 1], [1, 2]])]], 'class')
    result = evaluate(ds, [_OneSegment()], input_size=(2, 2), progress=False)
    row = result.summary[0]
    # Summed confusion: (1, 1) = 4 + 3, (2, 1) = 1. IoU_1 = 7 / (8 + 7 - 7), IoU_2 = 0; Acc_1 = 1, Acc_2 = 0.
    assert row['miou'] == pytest.approx((7 / 8 + 0) / 2)
    assert row['macc'] == pytest.approx(0.5)
    assert row['asa'] == pytest.approx((4 / 4 + 3 / 4) / 2)  # per image, then averaged
    assert row['images'] == 2 and row['segments'] == 1


def test_segment_labels_average_over_humans():
    # One 4x4 image, two humans: a left/right split and a single region; the method gives one segment.
    split = np.ones((4, 4))
    split[:, 2:] = 2
    ds = _Memory([[split, np.ones((4, 4))]], 'segment')
    row = evaluate(ds, [_OneSegment()], input_size=(4, 4), progress=False).summary[0]
    # Human 1: ASA 8/16, UE 2 * 8 / 16, BR 0, IoU (8/16 + 0) / 2, Acc (1 + 0) / 2.
    # Human 2: ASA 1, UE 0, BR undefined (no boundary: left out), IoU 1, Acc 1.
    assert row['asa'] == pytest.approx((0.5 + 1) / 2)
    assert row['undersegmentation_error'] == pytest.approx((1 + 0) / 2)
    assert row['boundary_recall'] == 0.0
    assert row['miou'] == pytest.approx((0.25 + 1) / 2)
    assert row['macc'] == pytest.approx((0.5 + 1) / 2)


def test_score_at_input_scores_the_grid_at_the_input_size(tmp_path):
    root = write_shapes_dataset(str(tmp_path / 'shapes'), 'folder', num_images=1, size=(60, 90))
    ds = open_dataset(root)
    at_input = evaluate(ds, [PatchGrid(196)], input_size=(224, 224), score_at='input', progress=False)
    at_gt = evaluate(ds, [PatchGrid(196)], input_size=(224, 224), score_at='gt', progress=False)
    # At 224x224 the grid is 16x16 squares (Q = pi / 4); resized to 90x60 its cells are not square.
    assert at_input.summary[0]['compactness'] == pytest.approx(math.pi / 4)
    assert at_gt.summary[0]['compactness'] < math.pi / 4 - 0.01
    assert at_input.config['score_at'] == 'input' and at_gt.summary[0]['segments'] == 196


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny():
    torch.manual_seed(0)
    return timm.create_model(TINY).eval()


def test_model_stage_and_head_choice(tiny):
    images = np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    merged = ModelSuperpixels(tiny, TINY)
    head2 = ModelSuperpixels(tiny, TINY, stage=1, head=2)
    assert merged.name == TINY and head2.name == f'{TINY} (stage 1, head 2)'
    assert merged.tokens == 196 and merged.num_heads == 2

    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - merged.mean) / merged.std
    with torch.inference_mode():
        stages = tiny.forward_superpixels(x)
    out = merged(images)
    assert np.array_equal(out.labels, stages[-1]['labels'].numpy())  # last stage, merged heads by default
    assert [title for title, _ in out.panels] == [f'{TINY}\nhead 1', f'{TINY}\nhead 2']
    assert np.array_equal(head2(images).labels, stage_labels(stages[0])[1][1].numpy())

    with pytest.raises(InputError, match="--head 3: .* 2 association heads; expected 'merged' or 1..2"):
        ModelSuperpixels(tiny, TINY, head=3)


@pytest.fixture(scope='module')
def tiny_checkpoint(tiny, tmp_path_factory):
    from safetensors.torch import save_file
    path = tmp_path_factory.mktemp('weights') / 'tiny.safetensors'
    save_file(tiny.state_dict(), str(path))
    return str(path)


def test_checkpoints_load_and_models_without_superpixels_are_refused(tmp_path, tiny, tiny_checkpoint):
    from safetensors.torch import save_file
    from spformer.hub.checkpoint import ModelReferenceError, load_model

    loaded = load_model(f'{TINY}={tiny_checkpoint}', argument='--model')
    assert loaded.trained and loaded.weights == tiny_checkpoint
    expected = tiny.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())

    # A ViT has no superpixels (timm's 0.4M-parameter test ViT, from a local checkpoint: no download).
    save_file(timm.create_model('test_vit').state_dict(), str(tmp_path / 'vit.safetensors'))
    vit = load_model(f'test_vit={tmp_path / "vit.safetensors"}').model
    with pytest.raises(InputError, match=r'VisionTransformer has no forward_superpixels\(\), so it makes no superp'):
        ModelSuperpixels(vit, 'test_vit')
    with pytest.raises(ModelReferenceError, match="--model 'no_such_model': no such file or folder, and not a "
                                                  "registered model; expected a registered name"):
        load_model('no_such_model', argument='--model')
    with pytest.raises(ModelReferenceError, match='is not a file'):
        load_model(f'{TINY}={tmp_path / "missing.safetensors"}')


def test_pictures_mark_untrained_models(tmp_path, tiny, monkeypatch):
    # The comparison figure's panels of a random-init model say UNTRAINED; a loaded model's do not.
    import spformer.pictures
    drawn = []
    monkeypatch.setattr(spformer.pictures, 'save_comparison_figure',
                        lambda image, gt, panels, path, **kw: drawn.append([title for title, _ in panels]))
    root = write_shapes_dataset(str(tmp_path / 'd'), 'folder', num_images=1, size=(64, 64), seed=0)
    methods = [ModelSuperpixels(tiny, 'random', trained=False), ModelSuperpixels(tiny, 'loaded', trained=True)]
    evaluate(open_dataset(root), methods, pictures=1, picture_dir=str(tmp_path / 'pics'), progress=False)
    [titles] = drawn
    scored = {t.split('\n')[0] for t in titles if '\nhead' not in t}
    assert scored == {'random (UNTRAINED)', 'loaded'}, titles


# ---------------------------------------------------------------------------------------------
# End to end: every layout through the CLI
# ---------------------------------------------------------------------------------------------

def _regions_are_flat_or_textured(root):
    """The generated label maps are exact: inside each label every channel spans at most the texture's
    24 grey levels, while neighbouring regions differ by >= 60 (Euclidean, so >= 34 in some channel)."""
    ds = open_dataset(root)
    for i in range(len(ds)):
        s = ds[i]
        for label in np.unique(s.ground_truths[0]):
            pixels = s.image[s.ground_truths[0] == label].astype(int)
            assert (pixels.max(0) - pixels.min(0)).max() <= 25, (s.name, label)


@pytest.mark.parametrize('layout', ['voc', 'bsds', 'folder'])
def test_cli_end_to_end(layout, tmp_path, capsys, tiny_checkpoint):
    root = write_shapes_dataset(str(tmp_path / layout), layout, num_images=2, size=(96, 128), seed=1)
    if layout == 'folder':  # lossless PNGs: the images can be checked against their labels
        _regions_are_flat_or_textured(root)
    out = tmp_path / 'out'
    # The model by name (random init) in two layouts, from a local checkpoint in the third.
    model = f'{TINY}={tiny_checkpoint}' if layout == 'folder' else TINY
    assert main([root, '--model', model, '--pictures', '1', '--out-dir', str(out), '--no-progress']) == 0
    text = capsys.readouterr().out
    assert f'dataset   : {layout}' in text
    assert (f'model     : {model}: {tiny_checkpoint};' if layout == 'folder' else 'UNTRAINED') in text
    for method in ('patch', 'slic', model):
        assert f'| {method} | ' in text
    assert '| method | segments | mIoU % | mAcc % | ASA % | BR % | UE % | CO | s/img |' in text

    results = json.loads((out / 'results.json').read_text())
    assert results['config']['layout'] == layout and results['config']['images'] == 2
    rows = {r['method']: r for r in results['summary']}
    # SLIC follows the shapes' outlines; the grid cuts across them.
    assert rows['slic']['asa'] > rows['patch']['asa']
    assert rows['slic']['boundary_recall'] > rows['patch']['boundary_recall']
    assert rows['patch']['segments'] == 196
    assert abs(rows['slic']['segments'] - 196) <= 0.1 * 196  # SLIC's count is matched to the grid's
    assert 0 < rows[model]['segments'] <= 196
    csv_lines = (out / 'results.csv').read_text().splitlines()
    assert csv_lines[0].startswith('method,weights,segments,miou,macc,asa,') and len(csv_lines) == 4
    assert len((out / 'per_image.csv').read_text().splitlines()) == 1 + 2 * 3

    pictures = sorted(os.listdir(out / 'pictures'))
    assert pictures == ['000_shapes_000.png']
    assert (out / 'pictures' / pictures[0]).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_folder_in_no_layout(tmp_path):
    (tmp_path / 'notes.txt').write_text('x')
    (tmp_path / 'pics').mkdir()
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), '--no-progress'])
    message = str(e.value)
    assert 'is in none of the supported layouts' in message
    for expected in ('JPEGImages/<id>.jpg', 'SegmentationClass/<id>.png', 'ImageSets/Segmentation/<split>.txt',
                     'groundTruth/<split>/<id>.mat', 'labels/<name>.png', 'notes.txt, pics/'):
        assert expected in message
    with pytest.raises(DatasetError, match=r"not in the voc layout .* missing JPEGImages/, SegmentationClass/"):
        open_dataset(str(tmp_path), layout='voc')


@pytest.mark.parametrize('layout,label', [
    ('voc', os.path.join('SegmentationClass', 'shapes_001.png')),
    ('bsds', os.path.join('groundTruth', 'test', 'shapes_001.mat')),
    ('folder', os.path.join('labels', 'shapes_001.png')),
])
def test_images_without_labels(layout, label, tmp_path):
    root = write_shapes_dataset(str(tmp_path), layout, num_images=2, size=(16, 16))
    os.remove(os.path.join(root, label))
    with pytest.raises(DatasetError, match=f'1 of 2 images .* have no .*: expected {os.path.join(root, label)}'):
        open_dataset(root)


def test_bad_arguments(tmp_path):
    root = write_shapes_dataset(str(tmp_path / 'd'), 'folder', num_images=1, size=(16, 16))
    cases = [
        (['--methods', 'patch', '--segments', '150'], 'segments=150: the patch grid needs a square number'),
        (['--model', 'no_such_model'], "--model 'no_such_model': no such file or folder, and not a registered model"),
        (['--model', TINY, '--stage', '3'], f'--stage 3: {TINY} has 2 stages; expected 1..2 or -1'),
        (['--model', TINY, '--input-size', '256'], '--input-size 256: the models take 224x224'),
        (['--ignore-index', 'void'], "--ignore-index 'void': expected a label value"),
        (['--tolerance', '-1'], '--tolerance -1: expected an integer >= 0'),
        (['--methods'], 'nothing to evaluate'),
        (['--split', 'val'], "split='val': the plain folder layout has no splits"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as e:
            main([root, '--no-progress', '--out-dir', str(tmp_path / 'o')] + args)
        assert message in str(e.value), (args, str(e.value))


# ---------------------------------------------------------------------------------------------
# spformer-visualize
# ---------------------------------------------------------------------------------------------

def test_visualize_writes_every_stage_and_head(tmp_path, capsys):
    from PIL import Image
    from skimage.data import astronaut

    image = tmp_path / 'astronaut.jpg'
    Image.fromarray(astronaut()[::4, ::4]).save(image)
    out = tmp_path / 'sp.png'
    assert visualize_main([str(image), '--model', TINY, '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'UNTRAINED' in text and 'resized to 224x224' in text
    assert text.count('of 196 superpixels (merged heads); per head: ') == 2
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(SystemExit, match="^spformer-visualize: IMAGE: cannot read image '.*missing.jpg': no such file$"):
        visualize_main([str(tmp_path / 'missing.jpg'), '--model', TINY])


# ---------------------------------------------------------------------------------------------
# The group level of the hierarchical models (--level group)
# ---------------------------------------------------------------------------------------------

HIER = 'spformer_hier_tiny_sp16_224'


def test_group_level(tiny, tmp_path, capsys):
    """ModelSuperpixels(level='group') scores forward_groups' hard pixel -> group map (49 groups at 224 px,
    made in stage 2); plain SPFormers and a --stage without groups are refused by name; the CLI and
    spformer-visualize take --level group."""
    torch.manual_seed(0)
    hier = timm.create_model(HIER).eval()
    groups = ModelSuperpixels(hier, HIER, level='group')
    head1 = ModelSuperpixels(hier, HIER, stage=2, head=1, level='group')
    assert groups.tokens == 49 and groups.stage_number == 2 and groups.num_heads == 2
    assert groups.name == f'{HIER} (group)' and head1.name == f'{HIER} (head 1, group)'
    images = np.random.default_rng(0).integers(0, 255, (1, 224, 224, 3), dtype=np.uint8)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - groups.mean) / groups.std
    with torch.inference_mode():
        out = hier.forward_groups(x)[0]
    assert np.array_equal(groups(images).labels, out['labels'].numpy())
    assert np.array_equal(head1(images).labels, out['head_labels'][:, 0].numpy())
    # the superpixel level of the same model is still there
    assert ModelSuperpixels(hier, HIER).tokens == 196

    with pytest.raises(InputError, match=r"--stage 1: .* has groups at stage 2 only; expected that or -1"):
        ModelSuperpixels(hier, HIER, stage=1, level='group')
    with pytest.raises(InputError, match=r"--model 'spformer_tiny_sp16_224': it makes no groups to score: it is not "
                                         r"a hierarchical model .*spformer_hier"):
        ModelSuperpixels(tiny, TINY, level='group')

    root = write_shapes_dataset(str(tmp_path / 'd'), 'folder', num_images=1, size=(64, 64), seed=1)
    assert main([root, '--model', HIER, '--level', 'group', '--methods', 'patch', '--pictures', '0',
                 '--out-dir', str(tmp_path / 'o'), '--no-progress']) == 0
    text = capsys.readouterr().out
    assert 'baselines : patch with 49 segments' in text and f'| {HIER} (group) | ' in text
    assert 'groups of stage 2, merged heads, 49 tokens' in text

    from PIL import Image
    Image.fromarray(images[0]).save(tmp_path / 'image.png')
    assert visualize_main([str(tmp_path / 'image.png'), '--model', HIER, '--level', 'group',
                           '--out', str(tmp_path / 'groups.png')]) == 0
    text = capsys.readouterr().out
    assert text.count('of 49 groups (merged heads); per head: ') == 1 and 'stage 2 : ' in text
    assert (tmp_path / 'groups.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# ---------------------------------------------------------------------------------------------
# Images as every tool reads them (spformer.images): 16 bits, unreadable files, output paths
# ---------------------------------------------------------------------------------------------

def _cut_in_half(path):
    data = open(path, 'rb').read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def test_a_16bit_copy_of_a_dataset_image_scores_as_its_8bit_original(tmp_path):
    import shutil
    from PIL import Image
    from test_images import write_png48
    root8 = write_shapes_dataset(str(tmp_path / 'd8'), 'folder', num_images=2, size=(96, 128), seed=1)
    root16 = str(tmp_path / 'd16')
    shutil.copytree(root8, root16)
    first, second = (os.path.join('images', f'shapes_00{i}.png') for i in (0, 1))
    grey = np.asarray(Image.open(os.path.join(root8, first)).convert('L'))
    Image.fromarray(grey).save(os.path.join(root8, first))                             # 8-bit grey
    Image.fromarray(grey.astype(np.uint16) * 257).save(os.path.join(root16, first))    # the same in 16 bits ('I;16')
    rgb = np.asarray(Image.open(os.path.join(root8, second)))
    write_png48(os.path.join(root16, second), rgb.astype(np.uint16) * 257)             # 48-bit RGB
    rows = {}
    for root in (root8, root16):
        out = os.path.join(root, 'out')
        assert main([root, '--methods', 'patch', 'slic', '--pictures', '0', '--out-dir', out, '--no-progress']) == 0
        with open(os.path.join(out, 'results.json')) as f:
            rows[root] = [{k: v for k, v in r.items() if 'second' not in k} for r in json.load(f)['per_image']]
    assert len(rows[root16]) == 4 and rows[root16] == rows[root8]


def test_eval_names_a_truncated_dataset_image(tmp_path):
    root = write_shapes_dataset(str(tmp_path / 'd'), 'folder', num_images=2, size=(16, 16))
    bad = os.path.join(root, 'images', 'shapes_001.png')
    _cut_in_half(bad)
    with pytest.raises(SystemExit) as e:
        main([root, '--methods', 'patch', '--pictures', '0', '--out-dir', str(tmp_path / 'o'), '--no-progress'])
    assert str(e.value) == (f"spformer-eval-superpixels: cannot read image '{bad}': truncated image data "
                            f"(image file is truncated)")


def test_eval_names_an_out_dir_it_cannot_write_before_loading_models(tmp_path, monkeypatch):
    import spformer.eval.cli
    root = write_shapes_dataset(str(tmp_path / 'd'), 'folder', num_images=1, size=(16, 16))

    def refuse(*args, **kwargs):
        raise AssertionError('a model was loaded before the output folder was checked')
    monkeypatch.setattr(spformer.eval.cli, 'load_model', refuse)
    (tmp_path / 'results.txt').write_text('x')
    for out_dir, problem in ((tmp_path / 'results.txt', f"'{tmp_path / 'results.txt'}' is a file, not a folder"),
                             (tmp_path / 'results.txt' / 'run1',
                              f"'{tmp_path / 'results.txt' / 'run1'}': '{tmp_path / 'results.txt'}' is a file, "
                              f"not a folder")):
        with pytest.raises(SystemExit) as e:
            main([root, '--model', TINY, '--out-dir', str(out_dir), '--no-progress'])
        assert str(e.value) == f'spformer-eval-superpixels: --out-dir {problem}'


def test_visualize_names_unreadable_images_and_outs_before_loading_the_model(tmp_path, monkeypatch):
    import spformer.hub.checkpoint
    from PIL import Image
    from skimage.data import astronaut

    def refuse(*args, **kwargs):
        raise AssertionError('the model was loaded before the cheap checks')
    monkeypatch.setattr(spformer.hub.checkpoint, 'load_model', refuse)
    image = tmp_path / 'cut.png'
    Image.fromarray(astronaut()[::4, ::4]).save(image)
    _cut_in_half(image)
    with pytest.raises(SystemExit) as e:
        visualize_main([str(image), '--model', TINY, '--out', str(tmp_path / 'x.png')])
    assert str(e.value) == (f"spformer-visualize: IMAGE: cannot read image '{image}': truncated image data "
                            f"(image file is truncated)")
    Image.fromarray(astronaut()[::4, ::4]).save(tmp_path / 'ok.png')
    (tmp_path / 'notes.txt').write_text('x')
    out = tmp_path / 'notes.txt' / 'x.png'
    with pytest.raises(SystemExit) as e:
        visualize_main([str(tmp_path / 'ok.png'), '--model', TINY, '--out', str(out)])
    assert str(e.value) == f"spformer-visualize: --out '{out}': '{tmp_path / 'notes.txt'}' is a file, not a folder"


def test_visualize_draws_a_16bit_image_as_its_8bit_original(tmp_path, capsys):
    from PIL import Image
    from skimage.data import camera
    grey = camera()[::4, ::4]
    Image.fromarray(grey).save(tmp_path / 'grey8.png')
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')
    printed = []
    for name in ('grey8', 'grey16'):
        assert visualize_main([str(tmp_path / f'{name}.png'), '--model', TINY, '--out', str(tmp_path / 'o' / f'{name}.png')]) == 0
        printed.append(capsys.readouterr().out.replace(name, 'IMAGE'))
    assert printed[0] == printed[1]  # the same superpixel counts per stage and head
    assert (tmp_path / 'o' / 'grey16.png').read_bytes() == (tmp_path / 'o' / 'grey8.png').read_bytes()


def test_console_script_prints_one_line_or_with_spformer_debug_the_traceback(tmp_path):
    """A fresh process, as a user runs it: one line on stderr and exit status 1; SPFORMER_DEBUG=1 the traceback."""
    import subprocess
    import sys
    from PIL import Image
    image = tmp_path / 'cut.jpg'
    Image.fromarray(np.zeros((64, 64, 3), np.uint8) + 90).save(image)
    _cut_in_half(image)
    script = os.path.join(os.path.dirname(sys.executable), 'spformer-visualize')
    command = [script] if os.path.exists(script) else [sys.executable, '-m', 'spformer.visualize']
    command += [str(image), '--model', TINY, '--out', str(tmp_path / 'x.png')]
    env = {k: v for k, v in os.environ.items() if k not in ('SPFORMER_DEBUG', 'SPFORMER_HUB_DEBUG')}
    plain = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert plain.returncode == 1 and plain.stdout == ''
    assert len(plain.stderr.splitlines()) == 1, plain.stderr
    assert plain.stderr.startswith(f"spformer-visualize: IMAGE: cannot read image '{image}': truncated image data")
    debug = subprocess.run(command, capture_output=True, text=True, timeout=300, env=dict(env, SPFORMER_DEBUG='1'))
    assert debug.returncode == 1
    assert debug.stderr.startswith('Traceback (most recent call last)') and '\nOSError: ' in debug.stderr  # PIL's
    assert debug.stderr.rstrip().splitlines()[-1].startswith('spformer.images.ImageReadError: IMAGE: cannot read image')


def test_label_upsampling_choice_reaches_the_model(tiny):
    # 'repeat': constant over every 4x4 block of the stride-4 pixel stream; the default resamples the
    # logits, so some blocks hold a boundary; bad values are named.
    images = np.random.default_rng(0).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    repeat = ModelSuperpixels(tiny, TINY, label_upsampling='repeat')(images).labels[0]
    blocks = repeat.reshape(56, 4, 56, 4)
    assert (blocks == blocks[:, :1, :, :1]).all()
    default = ModelSuperpixels(tiny, TINY)(images).labels[0].reshape(56, 4, 56, 4)
    assert not (default == default[:, :1, :, :1]).all()
    with pytest.raises(InputError, match="--label-upsampling 'nearest': expected 'bilinear' or 'repeat'"):
        ModelSuperpixels(tiny, TINY, label_upsampling='nearest')
