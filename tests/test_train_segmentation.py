"""train_segmentation.py on CPU, on generated street scenes: outputs, export, exact resume after SIGKILL, the lr
schedule, whole-image and sliding-window inference, paired augmentation, bad input, a Hugging Face dataset."""
import importlib.util
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from conftest import script_env
from spformer.eval.datasets import CITYSCAPES_CLASSES, open_dataset
from spformer.eval.street_scenes import render_street_scene, street_scenes_hf, write_street_scenes
from spformer.training.segmentation import (PairedAugment, SegmentationSamples, param_groups, predict_sliding,
                                            predict_whole, window_starts)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'train_segmentation.py'
MODEL = 'sp_transformer_r18_cityscapes'
TINY = 'neck_dim=64 num_blocks=1 tokenizer_layers=1 block_heads=2 img_size=(64,128)'  # token stride 32
UPDATES, WARMUP = 8, 3


def run_env(**extra) -> dict:
    return script_env(**{'HF_DATASETS_OFFLINE': '1', **extra})


def run(args, env=None, expect_rc=0, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), *map(str, args)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env or run_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != expect_rc:
        raise AssertionError(f'{" ".join(cmd)}\nexited {proc.returncode} (expected {expect_rc})\n'
                             f'--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}')
    return proc


def read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tiny_model():
    import timm
    from spformer.training.segmentation import parse_model_kwargs
    return timm.create_model(MODEL, num_classes=19, **parse_model_kwargs(TINY)).eval()


@pytest.fixture
def one_thread():
    """Models run in this process on one intra-op thread, as the training runs do (OMP_NUM_THREADS=1): the same
    numbers, and on shared cores two threads mostly wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory) -> Path:
    """12 training scenes of 64x128 and 3 validation scenes of 80x144 (not multiples of the token stride 32:
    whole-image inference pads them)."""
    root = tmp_path_factory.mktemp('scenes')
    write_street_scenes(str(root), 12, (64, 128), seed=0, split='train')
    write_street_scenes(str(root), 3, (80, 144), seed=0, split='val')
    return root


def run_args(data: Path, output: Path, *extra) -> list:
    return ['--data-dir', data, '--model', MODEL, '--backbone-pretrained', 'none', '--model-kwargs', TINY,
            '--crop-size', 64, 128, '--batch-size', 2, '--updates', UPDATES, '--warmup-updates', WARMUP,
            '--eval-every', 4, '--checkpoint-every', 2, '--log-interval', 1, '--picture-images', 1, '--no-plot',
            '--output', output, *extra]


@pytest.fixture(scope='module')
def learned(tmp_path_factory, scenes) -> dict:
    """One uninterrupted run of 8 updates (6 batches per epoch), validated at updates 4 and 8."""
    out = tmp_path_factory.mktemp('learned')
    proc = run(run_args(scenes, out / 'run', '--workers', 0), env=run_env(SPFORMER_TRAIN_TEST_DUMP=out / 'dump'))
    return dict(out=out / 'run', dump=out / 'dump', proc=proc, data=scenes)


def test_a_short_run_writes_checkpoints_metrics_picture_and_final(learned):
    out = learned['out']
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == [
        'step_00000004', 'step_00000006', 'step_00000008']  # every 2 updates, the last 3 kept
    assert (out / 'checkpoints' / 'step_00000008' / 'manifest.json').is_file()
    rows = read_jsonl(out / 'metrics.jsonl')
    assert [r['update'] for r in rows if r['kind'] == 'train'] == list(range(1, UPDATES + 1))
    val = [r for r in rows if r['kind'] == 'val']
    assert [r['update'] for r in val] == [4, 8]
    for r in val:
        assert 0 <= r['miou'] <= 100 and 0 <= r['pixel_accuracy'] <= 100 and r['samples'] == 3
        assert list(r['iou']) == list(CITYSCAPES_CLASSES) and r['inference'] == 'whole image'
    results = json.loads((out / 'final' / 'results.json').read_text())
    assert results['miou'] == val[-1]['miou'] and results['updates'] == UPDATES
    assert sorted(p.name for p in (out / 'final').iterdir()) == [
        'config.json', 'model.safetensors', 'results.json', 'train_config.yaml']
    config = json.loads((out / 'final' / 'config.json').read_text())
    assert config['architecture'] == MODEL and config['label_names'] == list(CITYSCAPES_CLASSES)
    assert config['model_args']['neck_dim'] == 64 and config['model_args']['backbone_pretrained'] is False
    with Image.open(out / 'predictions.png') as picture:
        assert picture.width > 600 and picture.height > 100
    stdout = learned['proc'].stdout
    assert 'update 8/8: val mIoU' in stdout and '| **mIoU** |' in stdout and '| traffic light |' in stdout


def test_final_folder_loads_back_with_timm_and_gives_the_same_logits(learned, one_thread):
    import timm
    reference = torch.load(learned['dump'] / 'final_logits.pt', weights_only=True)
    model = timm.create_model(f'local-dir:{learned["out"] / "final"}', pretrained=True).eval()
    with torch.no_grad():
        logits = model(reference['input'])
    assert logits.shape == (2, 19, 64, 128)
    assert torch.equal(logits, reference['model'])
    assert model.pretrained_cfg['label_names'] == list(CITYSCAPES_CLASSES)


def test_evaluate_scores_a_final_folder_whole_image_and_sliding_window(learned, script, capsys, one_thread):
    final = learned['out'] / 'final'
    config = json.loads((final / 'results.json').read_text())
    args = ['--data-dir', learned['data'], '--workers', 0, '--evaluate', final]
    assert script.main([str(a) for a in args]) == 0
    assert script.main([str(a) for a in args + ['--sliding-window', '--crop-size', 64, 128]]) == 0
    whole = json.loads((final / 'eval_whole_image.json').read_text())
    sliding = json.loads((final / 'eval_sliding_window.json').read_text())
    assert whole['miou'] == pytest.approx(config['miou'], abs=1e-9) and whole['samples'] == 3  # as validated
    assert sliding['inference'] == 'sliding window' and 0 <= sliding['miou'] <= 100
    assert '| **mIoU** |' in capsys.readouterr().out


def test_lr_is_poly_after_a_linear_warmup_and_a_tenth_on_the_backbone(learned):
    def hand(t, lr=1e-3):  # the lr update t + 1 uses: warm-up from 0 over 3 updates, then poly 0.9 over 8
        return lr * t / WARMUP if t < WARMUP else lr * (1 - t / UPDATES) ** 0.9

    rows = [r for r in read_jsonl(learned['out'] / 'metrics.jsonl') if r['kind'] == 'train']
    for r in rows:
        assert r['lr'] == pytest.approx(hand(r['update'] - 1), rel=1e-12, abs=1e-15), r
        assert r['lr_backbone'] == pytest.approx(0.1 * hand(r['update'] - 1), rel=1e-12, abs=1e-15), r
    assert rows[0]['lr'] == 0 and rows[WARMUP]['lr'] == pytest.approx(1e-3 * (1 - WARMUP / UPDATES) ** 0.9)
    # The groups: every backbone parameter at lr_scale 0.1; no weight decay on 1-D parameters and embeddings.
    model = tiny_model()
    groups = {g['name']: g for g in param_groups(model, 0.05, 0.1)}
    assert set(groups) == {'backbone', 'backbone_no_decay', 'decoder', 'decoder_no_decay'}
    names = {id(p): n for n, p in model.named_parameters()}
    for name, g in groups.items():
        assert g['lr_scale'] == (0.1 if name.startswith('backbone') else 1.0)
        assert g['weight_decay'] == (0.0 if name.endswith('no_decay') else 0.05)
        assert all(names[id(p)].startswith('backbone.') == name.startswith('backbone') for p in g['params'])
    assert any(names[id(p)] == 'sp_queries' for p in groups['decoder_no_decay']['params'])
    assert sum(len(g['params']) for g in groups.values()) == len(list(model.parameters()))


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory, scenes) -> dict:
    """The same run SIGKILLed while writing the checkpoint of update 4, then resumed (--resume latest, with a
    loader worker this time) from update 2 (mid-epoch 1) to the end (across the epoch boundary at 6)."""
    out = tmp_path_factory.mktemp('interrupted')
    run(run_args(scenes, out / 'run', '--workers', 0), env=run_env(SPFORMER_TRAIN_TEST_KILL_AT=4),
        expect_rc=-signal.SIGKILL)
    after_kill = sorted(p.name for p in (out / 'run' / 'checkpoints').iterdir())
    resumed = run(run_args(scenes, out / 'run', '--workers', 1, '--resume', 'latest'),
                  env=run_env(SPFORMER_TRAIN_TEST_DUMP=out / 'dump'))
    return dict(out=out / 'run', dump=out / 'dump', after_kill=after_kill, resumed=resumed)


def test_sigkill_then_resume_latest_ends_with_the_same_weights(learned, interrupted):
    assert interrupted['after_kill'] == ['.tmp-step_00000004', 'step_00000002']
    assert 'step_00000002: epoch 0, batch 2, update 2' in interrupted['resumed'].stdout
    straight = json.loads((learned['dump'] / 'rank0.json').read_text())
    resumed = json.loads((interrupted['dump'] / 'rank0.json').read_text())
    assert resumed['weights_sha256'] == straight['weights_sha256']
    # The resumed run saw the rest of epoch 0 and epoch 1 exactly as the straight run did (same crops).
    assert resumed['samples']['0'] == straight['samples']['0'][4:] and resumed['samples']['1'] == straight['samples']['1']
    assert resumed['images']['0'] == straight['images']['0'][4:] and resumed['images']['1'] == straight['images']['1']
    a, b = load_file(str(learned['out'] / 'final' / 'model.safetensors')), \
        load_file(str(interrupted['out'] / 'final' / 'model.safetensors'))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows_a, rows_b = read_jsonl(learned['out'] / 'metrics.jsonl'), read_jsonl(interrupted['out'] / 'metrics.jsonl')
    assert [(r['kind'], r['update'], r.get('loss'), r.get('miou')) for r in rows_a] == \
        [(r['kind'], r['update'], r.get('loss'), r.get('miou')) for r in rows_b]


# ------------------------------------------------------------------------------------------------------------
# Inference: whole image and sliding window
# ------------------------------------------------------------------------------------------------------------

def test_sliding_window_covering_the_image_equals_whole_image_inference(one_thread):
    torch.manual_seed(0)
    model = tiny_model()
    x = torch.randn(1, 3, 50, 100)  # padded to 64 x 128 by both
    with torch.no_grad():
        whole = predict_whole(model, x, 32)
        assert whole.shape == (1, 19, 50, 100)
        for window in ((64, 128), (96, 160)):  # the image's padded size, and larger (shrunk to it)
            assert torch.equal(predict_sliding(model, x, window, 1 / 3, 32), whole), window
        smaller = predict_sliding(model, x, (32, 64), 1 / 3, 32)
    assert smaller.shape == whole.shape and not torch.equal(smaller, whole)


class PositionToy(nn.Module):
    """Logits that depend on the content and on where in its input a pixel sits: a window put elsewhere, or
    an average over the wrong windows, gives other numbers."""

    def forward(self, x):
        B, _, H, W = x.shape
        ramp = torch.arange(H, dtype=x.dtype)[:, None] * 0.1 + torch.arange(W, dtype=x.dtype)[None, :] * 0.01
        return torch.stack([x[:, 0] * 2 + ramp, x[:, 1] - ramp, x.mean((1, 2, 3))[:, None, None].expand(B, H, W)], 1)


def test_sliding_window_against_a_hand_made_tiling():
    # 20 x 36 padded to 24 x 40 (stride 8); 16 x 24 windows with half overlap: rows at 0, 8; columns at 0, 12, 16.
    assert window_starts(24, 16, 0.5) == [0, 8] and window_starts(40, 24, 0.5) == [0, 12, 16]
    assert window_starts(96, 32, 1 / 3) == [0, 22, 44, 64] and window_starts(32, 32, 0.3) == [0]
    x = torch.randn(2, 3, 20, 36, generator=torch.Generator().manual_seed(1))
    padded = torch.zeros(2, 3, 24, 40)
    padded[..., :20, :36] = x
    total, count = torch.zeros(2, 3, 24, 40), torch.zeros(24, 40)
    toy = PositionToy()
    for y in (0, 8):
        for x0 in (0, 12, 16):
            total[..., y:y + 16, x0:x0 + 24] += toy(padded[..., y:y + 16, x0:x0 + 24])
            count[y:y + 16, x0:x0 + 24] += 1
    oracle = (total / count)[..., :20, :36]
    for batch_size in (1, 4):
        assert torch.allclose(predict_sliding(toy, x, (16, 24), 0.5, 8, batch_size), oracle, atol=1e-6)


# ------------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------------

def test_paired_augmentation_keeps_image_and_label_aligned_and_pads_with_255():
    H, W = 40, 60
    yy, xx = np.mgrid[0:H, 0:W]
    image = np.stack([xx * 4, yy * 4, np.full_like(xx, 200)], -1).astype(np.uint8)  # colour = position
    label = (yy * W + xx).astype(np.int64)  # label = position
    fill = (124, 116, 104)
    seen_flip = seen_pad = 0
    for seed in range(12):
        augment = PairedAugment((48, 64), (0.5, 2.0), hflip=0.5, color_jitter=0, fill=fill, ignore_index=-1)
        out_image, out_label = augment(image, label, np.random.default_rng(seed))
        assert out_image.shape == (48, 64, 3) and out_label.shape == (48, 64)
        inside = out_label >= 0
        y0, x0 = out_label[inside] // W, out_label[inside] % W
        # bilinear image vs nearest label: the colour is the position of the label's pixel, within a pixel
        assert np.abs(out_image[inside][:, 0] / 4 - x0).max() <= 1.01, seed
        assert np.abs(out_image[inside][:, 1] / 4 - y0).max() <= 1.01, seed
        assert (out_image[~inside] == fill).all()  # padding: the mean colour, label ignored
        seen_pad += (~inside).any()
        step = np.diff(out_label[inside.all(1)] % W, axis=1)  # along rows with no padding
        seen_flip += step.size > 0 and (step <= 0).all() and (step < 0).any()
    assert seen_flip and seen_pad
    # Downscaled to half: 20 x 30 inside a 48 x 64 crop, the rest 255.
    augment = PairedAugment((48, 64), (0.5, 0.5), hflip=0, color_jitter=0.3, fill=fill)
    out_image, out_label = augment(image, label, np.random.default_rng(0))
    assert (out_label != 255).sum() == 20 * 30 and (out_image[out_label == 255] == fill).all()


def test_samples_are_seeded_by_seed_epoch_and_index(scenes):
    dataset = open_dataset(str(scenes), 'cityscapes', 'train')
    from spformer.training.segmentation import FolderSource
    source = FolderSource(dataset)
    samples = SegmentationSamples(source, 19, (0.5,) * 3, (0.25,) * 3, PairedAugment((64, 128)), seed=3)
    a, b, c = samples[(0, 5)], samples[(0, 5)], samples[(1, 5)]
    assert torch.equal(a['image'], b['image']) and torch.equal(a['label'], b['label'])
    assert not torch.equal(a['image'], c['image'])
    assert a['image'].shape == (3, 64, 128) and a['label'].dtype == torch.int64 and a['index'] == 5


def test_street_scenes_are_deterministic_and_read_as_cityscapes(scenes):
    image, label = render_street_scene((64, 128), seed=0, split='train', index=3)
    again = render_street_scene((64, 128), seed=0, split='train', index=3)
    assert np.array_equal(image, again[0]) and np.array_equal(label, again[1])
    assert not np.array_equal(label, render_street_scene((64, 128), seed=0, split='val', index=3)[1])
    dataset = open_dataset(str(scenes), 'auto', 'train')
    assert dataset.layout == 'cityscapes' and len(dataset) == 12
    sample = dataset[dataset.names.index('brookfield/brookfield_000003_000019')]  # odd indices: the second city
    assert np.array_equal(sample.image, image) and np.array_equal(sample.ground_truths[0], label)
    labels = np.concatenate([dataset[i].ground_truths[0].ravel() for i in range(len(dataset))])
    present = set(np.unique(labels).tolist())
    assert present <= set(range(19)) | {255}
    assert {0, 1, 2, 5, 10, 13} <= present  # road, sidewalk, building, pole, sky, car in 12 scenes


# ------------------------------------------------------------------------------------------------------------
# Bad input, configuration, a Hugging Face dataset
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def script():
    spec = importlib.util.spec_from_file_location('train_segmentation', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def error_line(script, capsys, *args) -> str:
    assert script.main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('train_segmentation.py: error: '), err
    return err[0]


def test_bad_input_stops_with_one_line_and_status_2(script, capsys, scenes, tmp_path, one_thread):
    # Labels outside the classes, read by a loader worker: a fresh process through the CLI, started first.
    bad = tmp_path / 'bad'
    write_street_scenes(str(bad), 2, (64, 128), seed=0, split='train')
    write_street_scenes(str(bad), 1, (64, 128), seed=0, split='val')
    for path in sorted((bad / 'gtFine' / 'train').rglob('*_labelTrainIds.png')):
        label = np.asarray(Image.open(path)).copy()
        label[:3, :3], label[-3:, -3:] = 40, 19
        Image.fromarray(label).save(path)
    proc = subprocess.Popen([sys.executable, str(SCRIPT), *map(str, run_args(bad, tmp_path / 'bad_out', '--workers', 1))],
                            cwd=ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = ['--model', MODEL, '--backbone-pretrained', 'none', '--model-kwargs', TINY, '--output', tmp_path / 'out']
    (tmp_path / 'nothing' / 'photos').mkdir(parents=True)
    line = error_line(script, capsys, '--data-dir', tmp_path / 'nothing', *base)
    assert '--data-dir' in line and 'none of the supported layouts' in line and 'cityscapes' in line
    line = error_line(script, capsys, '--data-dir', scenes, *base, '--crop-size', 60, 120)
    assert '--crop-size: got 60 120, not multiples of the token stride 32' in line and 'e.g. 64 128' in line
    line = error_line(script, capsys, '--data-dir', scenes, *base, '--layout', 'ade20k')
    assert 'ade20k' in line and 'missing' in line
    line = error_line(script, capsys, '--data-dir', scenes, *base, '--model', 'resnet50')
    assert "--model: 'resnet50'" in line and 'sp_transformer_r50_cityscapes' in line
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr[-3000:]
    lines = [s for s in stderr.split('train_segmentation.py: error: ')[1:]]
    assert len(lines) == 1 and '\n' not in lines[0].strip(), stderr[-3000:]
    assert '_gtFine_labelTrainIds.png: label values 19, 40 are outside the 19 classes' in lines[0]


def test_yaml_config_sets_defaults_and_flags_override_it(script, tmp_path):
    cfg = tmp_path / 'cfg.yaml'
    cfg.write_text('crop-size: [512, 1024]\nupdates: 90000\nmodel-kwargs: neck_dim=128\nsliding-window: true\n')
    args = script.parse_args(['--config', str(cfg), '--data-dir', 'x', '--updates', '100'])
    assert args.crop_size == [512, 1024] and args.updates == 100 and args.sliding_window
    assert args.model_kwargs == 'neck_dim=128' and args.lr == 1e-3 and args.backbone_lr_scale == 0.1
    assert args.warmup_updates == 5000 and args.poly_power == 0.9 and args.top_k_percent == 0.2


def test_hugging_face_dataset_saved_to_disk_with_sliding_window_validation(scenes, tmp_path):
    street_scenes_hf(str(scenes)).save_to_disk(str(tmp_path / 'hf'))
    out = tmp_path / 'run'
    run(['--hf-dataset', tmp_path / 'hf', '--layout', 'cityscapes', '--model', MODEL, '--backbone-pretrained', 'none',
         '--model-kwargs', TINY, '--crop-size', 32, 64, '--batch-size', 4, '--updates', 2, '--warmup-updates', 1,
         '--sliding-window', '--picture-images', 0, '--no-plot', '--workers', 0, '--log-interval', 1, '--output', out],
        env=run_env(HF_HOME=tmp_path / 'hf_home'))
    results = json.loads((out / 'final' / 'results.json').read_text())
    assert results['inference'] == 'sliding window' and results['samples'] == 3
    assert list(results['iou']) == list(CITYSCAPES_CLASSES)
    assert [r['update'] for r in read_jsonl(out / 'metrics.jsonl') if r['kind'] == 'train'] == [1, 2]  # 12 / 4 per epoch


def test_class_palette_is_one_set_of_distinct_colours():
    """spformer.pictures.class_palette, used by the training pictures, the Hub card and the benchmark: Cityscapes'
    own colours for its 19 classes (values from cityscapesscripts' labels.py, by hand), distinct colours for other
    counts, black for the ignore label, and colourize looks them up."""
    from spformer.pictures import class_palette, colourize
    cityscapes = class_palette(19)
    assert tuple(cityscapes[0]) == (128, 64, 128) and tuple(cityscapes[10]) == (70, 130, 180)  # road, sky
    assert tuple(cityscapes[13]) == (0, 0, 142) and tuple(cityscapes[255]) == (0, 0, 0)  # car, ignore
    for n in (2, 5, 20, 150, 300):
        colours = class_palette(n)
        assert colours.dtype == np.uint8 and len(colours) == max(256, n)
        assert len({tuple(c) for c in colours[:n]}) == n, n  # distinguishable classes
        assert np.array_equal(colours, class_palette(n))  # the same every call
    labels = np.array([[0, 1], [255, 18]])
    assert np.array_equal(colourize(labels, cityscapes), cityscapes[labels])
