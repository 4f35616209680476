"""spformer.hub for SP-Transformer segmenters: train_segmentation.py's final/ and models in memory pushed to the
Hub with a model card, and loaded back the timm way (``hf-hub:`` ids) and through every model reference.

As in tests/test_hub.py (whose fixtures these tests reuse), the Hub is never reached: pushes go through the
real ``huggingface_hub`` client to ``spformer.hub.testing.FakeHub``. Oracles are independent of the code under
test: the logits of the in-memory model (or of train_segmentation.py's final/ loaded by timm's ``local-dir:``),
``safetensors`` for what was pushed, ``yaml.safe_load`` for the card, PIL for the picture.
"""
import importlib.util
import io
import json
import os
import pathlib
import re
import sys

import pytest
import safetensors.torch
from safetensors.torch import load as load_safetensors_bytes
import timm
import torch
from huggingface_hub import constants, snapshot_download
from PIL import Image

import spformer  # noqa: F401  (registers the models)
from spformer.hub import load_checkpoint_folder, load_model, push_to_hub, save_pretrained
from spformer.hub.cli import main as hub_cli
from spformer.hub.testing import FakeHub
from test_hub import PUBLISHED, TOKEN, _front_matter, _run_python
from test_hub import fake_hub, hub_home  # noqa: F401,F811  (test_hub.py's fixtures: a fresh Hub cache, the fake Hub)

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODEL = 'sp_transformer_r18_cityscapes'
# A small decoder at 64x128: token stride 8 x 4 = 32, a 2x4 superpixel grid.
SMALL = dict(neck_dim=64, num_blocks=1, tokenizer_layers=1, block_heads=2)
H, W = 64, 128
LABELS = ['road', 'car', 'sky', 'tree', 'person']
RESULTS = dict(miou=41.25, pixel_accuracy=88.5, samples=3, inference='whole image', updates=8,
               iou=dict(road=80.5, car=None, sky=50.0, tree=20.25, person=14.25))
BOTH_FAMILIES = 'SPFormer classifier or an SP-Transformer segmenter'


def _usage(card: str) -> str:
    return re.search(r'## Usage\n\n```python\n(.*?)```', card, re.S).group(1)


def _png_size(data: bytes):
    with Image.open(io.BytesIO(data)) as picture:
        picture.load()
        assert picture.format == 'PNG'
        return picture.size


@pytest.fixture(scope='module')
def segmenter():
    """A 5-class segmenter with a small decoder, its weights and BatchNorm statistics moved off their init."""
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=len(LABELS), img_size=(H, W), **SMALL)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.02)
    return model.eval()


@pytest.fixture(scope='module')
def x():
    return torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(1))


def _outputs(model, x):
    with torch.inference_mode():
        out = model.eval().forward_superpixels(x)
    return out['logits'], out['labels']


# train_segmentation.py, run in a fresh process whose huggingface_hub talks to a FakeHub; the fake's repos are
# saved for the test process when the run ends.
_TRAIN_AND_PUSH = '''
import runpy, sys
from spformer.hub.testing import FakeHub
state, script = sys.argv[1], sys.argv[2]
hub, code = FakeHub(), 0
with hub.installed():
    sys.argv = sys.argv[2:]
    try:
        runpy.run_path(script, run_name='__main__')
    except SystemExit as e:
        code = e.code
hub.save(state)
sys.exit(code)
'''
RUN_REPO = 'spformer-test/sp-run'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
    """One update of train_segmentation.py on generated street scenes, with --push-to-hub --hub-private."""
    import subprocess
    from spformer.eval.street_scenes import write_street_scenes
    root = tmp_path_factory.mktemp('segrun')
    write_street_scenes(str(root / 'scenes'), 2, (H, W), seed=0, split='train')
    write_street_scenes(str(root / 'scenes'), 1, (H, W), seed=0, split='val')
    kwargs = ' '.join(f'{k}={v}' for k, v in SMALL.items()) + f' img_size=({H},{W})'
    args = ['--data-dir', root / 'scenes', '--model', MODEL, '--backbone-pretrained', 'none', '--model-kwargs', kwargs,
            '--crop-size', H, W, '--batch-size', 2, '--updates', 1, '--warmup-updates', 0, '--eval-every', 0,
            '--checkpoint-every', 0, '--picture-images', 0, '--no-plot', '--workers', 0, '--output', root / 'out',
            '--push-to-hub', RUN_REPO, '--hub-private']
    env = {k: v for k, v in os.environ.items() if not k.startswith(('SPFORMER_TRAIN_TEST_', 'HF_HUB_CACHE'))}
    env.update(OMP_NUM_THREADS='1', HF_HUB_OFFLINE='0', HF_DATASETS_OFFLINE='1', HF_TOKEN=TOKEN,
               HF_HOME=str(root / 'hf_home'))
    proc = subprocess.run([sys.executable, '-c', _TRAIN_AND_PUSH, root / 'hub', ROOT / 'train_segmentation.py',
                           *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return dict(final=root / 'out' / 'final', state=root / 'hub', stdout=proc.stdout)


@pytest.fixture(scope='module')
def final_outputs(run, x):
    """Logits and superpixels of the run's final/ loaded by timm's own local-dir: loader."""
    return _outputs(timm.create_model(f'local-dir:{run["final"]}', pretrained=True), x)


# Load a pushed repo from the Hub cache alone (HF_HUB_OFFLINE=1) in a fresh process, save its outputs, then run the
# usage block of its model card as written (on a picture file).
_LOAD_OFFLINE = '''
import os, sys, torch, safetensors.torch
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
repo, x_path, out_path, usage_path, image = sys.argv[1:6]
import spformer  # registers the models with timm: all a user needs before create_model
import timm
model = timm.create_model(f'hf-hub:{repo}', pretrained=True).eval()
x = safetensors.torch.load_file(x_path)['x']
with torch.inference_mode():
    out = model.forward_superpixels(x)
safetensors.torch.save_file({'logits': out['logits'].contiguous(), 'labels': out['labels'].contiguous()}, out_path)
print('loaded', model.pretrained_cfg.get('hf_hub_id'), model.pretrained_cfg['label_names'][:2])
usage = open(usage_path).read().replace("'image.jpg'", repr(image))
exec(compile(usage, 'README.md usage', 'exec'), {})
'''


# ------------------------------------------------------------------------------------------ acceptance

def test_train_segmentation_pushes_final_and_hf_hub_id_loads_offline_in_fresh_process(
        run, x, final_outputs, hub_home, tmp_path, monkeypatch):  # noqa: F811
    final = run['final']
    assert f'pushed {final} to https://huggingface.co/{RUN_REPO}' in run['stdout']
    hub = FakeHub.load(run['state'])
    assert hub.repos[RUN_REPO].private  # --hub-private
    commits = hub.commits(RUN_REPO)
    assert sorted(commits[-1].added) == sorted(PUBLISHED) and commits[-1].message == f'Add {MODEL} weights'
    files = hub.files(RUN_REPO)
    assert set(files) == PUBLISHED | {'.gitattributes'}

    # The weights of final/, tensor for tensor; its config (classes, label names, the run's model arguments).
    pushed = load_safetensors_bytes(files['model.safetensors'])
    local = safetensors.torch.load_file(str(final / 'model.safetensors'))
    assert pushed.keys() == local.keys() and all(torch.equal(pushed[k], local[k]) for k in local)
    config = json.loads(files['config.json'])
    local_config = json.loads((final / 'config.json').read_text())
    assert config['architecture'] == MODEL and config['num_classes'] == 19
    assert config['label_names'] == local_config['label_names'] and len(config['label_names']) == 19
    assert config['model_args']['neck_dim'] == 64 and config['model_args']['backbone_pretrained'] is False

    # The card: a segmenter's front matter; a local dataset folder gives no Hub dataset and no model-index.
    card = files['README.md'].decode()
    meta = _front_matter(card)
    assert meta['pipeline_tag'] == 'image-segmentation' and meta['library_name'] == 'timm'
    assert meta['tags'] == ['timm', 'spformer', 'sp-transformer', 'semantic-segmentation']
    assert meta['metrics'] == ['accuracy', 'mean_iou'] and 'datasets' not in meta and 'model-index' not in meta
    results = json.loads((final / 'results.json').read_text())
    assert f"| miou | {results['miou']:.6g} |" in card
    assert f"| pixel_accuracy | {results['pixel_accuracy']:.6g} |" in card
    for name, value in results['iou'].items():  # the per-class IoU table, '-' for classes absent from both
        assert f'| {name} | {"-" if value is None else f"{value:.2f}"} |' in card
    assert '- **Dataset:** a local dataset folder (cityscapes layout), not on the Hub' in card
    assert '- **Backbone:** `resnet18`' in card and 'token stride 32' in card
    assert str(final.parent) not in card and 'data_dir' not in card  # no local paths
    assert 'the only weights in the folder' not in card  # nothing to choose between: no note about it
    assert 'arXiv:2309.16889' in card and 'Superpixel Transformers for Efficient Semantic Segmentation' in card
    assert _png_size(files['superpixels.png'])[0] > 600

    # The Hub cache, filled from the fake; then a fresh process loads the hf-hub: id from it with the Hub
    # unreachable (HF_HUB_OFFLINE=1), gives the logits and superpixels of final/ loaded here by timm's local-dir:
    # loader, and runs the card's usage block as written.
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    with hub.installed():
        snapshot_download(RUN_REPO, token=TOKEN)
    safetensors.torch.save_file({'x': x.contiguous()}, str(tmp_path / 'x.safetensors'))
    (tmp_path / 'usage.py').write_text(_usage(card))
    Image.new('RGB', (300, 200), (90, 140, 60)).save(tmp_path / 'image.png')
    proc = _run_python(_LOAD_OFFLINE, RUN_REPO, tmp_path / 'x.safetensors', tmp_path / 'out.safetensors',
                       tmp_path / 'usage.py', tmp_path / 'image.png', env=dict(HF_HUB_OFFLINE='1'))
    loaded = safetensors.torch.load_file(str(tmp_path / 'out.safetensors'))
    logits, labels = final_outputs
    assert torch.equal(loaded['logits'], logits) and torch.equal(loaded['labels'], labels)
    out = proc.stdout.splitlines()
    assert out[0] == f"loaded {RUN_REPO} ['road', 'sidewalk']"
    assert re.fullmatch(r'\d+ superpixels on a 2x4 grid', out[-1]) and '% of the pixels' in out[1], out


def test_push_a_segmenter_in_memory_card_metrics_picture_and_hf_hub_logits(fake_hub, segmenter, x):  # noqa: F811
    repo = 'spformer-test/sp-tiny'
    url = push_to_hub(segmenter, repo, token=TOKEN, label_names=LABELS, metrics=RESULTS,
                      train_config=dict(model=MODEL, hf_dataset='someone/street-scenes', val_split='validation',
                                        output='/home/me/runs/x'))
    assert url == f'{constants.ENDPOINT}/{repo}/commit/{fake_hub.commits(repo)[-1].oid}'
    files = fake_hub.files(repo)
    assert set(files) == PUBLISHED | {'.gitattributes'}
    config = json.loads(files['config.json'])
    assert config['label_names'] == LABELS and config['model_args']['img_size'] == [H, W]

    card = files['README.md'].decode()
    meta = _front_matter(card)
    assert meta['pipeline_tag'] == 'image-segmentation' and meta['datasets'] == ['someone/street-scenes']
    [result] = meta['model-index'][0]['results']
    assert result['task'] == {'type': 'image-segmentation', 'name': 'Semantic Segmentation'}
    assert result['dataset'] == dict(type='someone/street-scenes', name='someone/street-scenes', split='validation')
    assert {m['name']: m['value'] for m in result['metrics']} == {'mIoU': 41.25, 'Pixel accuracy': 88.5}
    assert {m['type'] for m in result['metrics']} == {'mean_iou', 'accuracy'}
    assert '| car | - |' in card and '| road | 80.50 |' in card and '/home/me' not in card
    usage = _usage(card)
    assert usage.splitlines()[0].startswith('import spformer') and "model.forward_superpixels(x)" in usage
    assert f"timm.create_model('hf-hub:{repo}', pretrained=True)" in usage and '(1, 5, 64, 128)' in usage
    assert 'author={Zhu, Alex Zihao and Mei, Jieru and Qiao, Siyuan' in card
    assert _png_size(files['superpixels.png'])[0] > 600

    loaded = timm.create_model(f'hf-hub:{repo}', pretrained=True)  # timm's loader, served by the fake
    logits, labels = _outputs(loaded, x)
    expected_logits, expected_labels = _outputs(segmenter, x)
    assert logits.shape == (1, len(LABELS), H, W)
    assert torch.equal(logits, expected_logits) and torch.equal(labels, expected_labels)
    assert loaded.pretrained_cfg['label_names'] == LABELS


def test_cli_push_final_folder_and_its_safetensors_file(fake_hub, run, capsys):  # noqa: F811
    final = run['final']
    assert hub_cli(['push', str(final), '--repo-id', 'spformer-test/sp-cli', '--dataset', 'someone/scenes',
                    '--token', TOKEN]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[0] == f'weights : {final / "model.safetensors"}: model.safetensors: the only weights in the folder'
    files = fake_hub.files('spformer-test/sp-cli')
    results = json.loads((final / 'results.json').read_text())
    [result] = _front_matter(files['README.md'].decode())['model-index'][0]['results']
    assert {m['name']: m['value'] for m in result['metrics']} == {
        'mIoU': results['miou'], 'Pixel accuracy': results['pixel_accuracy']}  # results.json, as written

    # The weights file alone, with --model: the config.json beside it gives its construction arguments.
    assert hub_cli(['push', str(final / 'model.safetensors'), '--model', MODEL, '--repo-id', 'spformer-test/sp-file',
                    '--token', TOKEN]) == 0
    single = fake_hub.files('spformer-test/sp-file')
    assert single['model.safetensors'] == files['model.safetensors']
    assert json.loads(single['config.json'])['model_args'] == json.loads(files['config.json'])['model_args']


def _same_weights(model, state) -> bool:
    mine = model.state_dict()
    return mine.keys() == state.keys() and all(torch.equal(mine[k], state[k]) for k in state)


def test_every_model_reference_loads_a_segmenter(run, segmenter, tmp_path):
    # The folder, NAME=FILE and FILE next to its config.json: the run's model (its construction arguments from
    # config.json) with the run's tensors, unchanged (the logits of the folder are checked above).
    final = run['final']
    weights = safetensors.torch.load_file(str(final / 'model.safetensors'))
    for reference in (str(final), f'{MODEL}={final / "model.safetensors"}', str(final / 'model.safetensors')):
        loaded = load_model(reference, argument='--model')
        assert loaded.trained and loaded.model.img_size == (H, W) and loaded.model.neck_dim == 64, reference
        assert _same_weights(loaded.model, weights), reference
    assert _same_weights(load_checkpoint_folder(final), weights)

    # A bare weights file (no config.json beside it): its reference input comes from its superpixel queries (2x4
    # cells of 32 px), not from the registered configuration's 1024x2048 (whose grid they would be resampled to).
    state = {k: v.contiguous() for k, v in segmenter.state_dict().items()}
    safetensors.torch.save_file(state, str(tmp_path / 'w.safetensors'))
    loaded = load_model(f'{MODEL}={tmp_path / "w.safetensors"}', **SMALL).model
    assert loaded.img_size == (H, W) and loaded.num_classes == len(LABELS)
    assert loaded.pretrained_cfg['input_size'] == (3, H, W) and _same_weights(loaded, state)


def test_other_models_are_refused_naming_both_families(fake_hub, tmp_path):  # noqa: F811
    with pytest.raises(TypeError, match=f'model must be an {BOTH_FAMILIES} .*got Linear'):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / 'out')
    vit = timm.create_model('test_vit')
    with pytest.raises(TypeError, match=f'model must be an {BOTH_FAMILIES} made by timm.create_model.*got '
                                        'VisionTransformer'):
        push_to_hub(vit, 'o/n', token=TOKEN)
    file = tmp_path / 'vit.safetensors'
    safetensors.torch.save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(file))
    with pytest.raises(ValueError, match=r"model_name='test_vit' is not an SPFormer variant nor an SP-Transformer "
                                         r"variant \(spformer.hub publishes SPFormer classifiers and SP-Transformer segmenters\); expected one of "
                                         r"the SPFormer variants: spformer_.*SP-Transformer variants: "
                                         rf".*{MODEL}"):
        push_to_hub(file, 'o/n', model_name='test_vit', token=TOKEN)
    with pytest.raises(SystemExit, match="model_name='resnet18' is not an SPFormer variant nor an SP-Transformer"):
        hub_cli(['push', str(file), '--model', 'resnet18', '--repo-id', 'o/n', '--token', TOKEN])
    assert 'o/n' not in fake_hub.repos  # refused before a repo was created


def test_train_segmentation_refuses_a_bad_push_to_hub_repo_before_training(capsys):
    spec = importlib.util.spec_from_file_location('train_segmentation', ROOT / 'train_segmentation.py')
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    args = script.parse_args(['--data-dir', 'x', '--push-to-hub', 'o/n', '--hub-private'])
    assert args.push_to_hub == 'o/n' and args.hub_private
    assert script.main(['--data-dir', 'x', '--push-to-hub', 'no-namespace']) == 2
    assert capsys.readouterr().err.strip() == (
        "train_segmentation.py: error: --push-to-hub: got 'no-namespace'; expected a Hub repo id 'ORG/NAME'")
