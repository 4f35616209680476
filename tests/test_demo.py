"""spformer-demo end to end, the superpixel figure helpers, and the README table replacement of bench/model_table.py."""
import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from spformer.demo import main
from spformer.hub.checkpoint import weights_source
from spformer.visualize import stage_labels, superpixel_boundaries

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_model_table():
    spec = importlib.util.spec_from_file_location('model_table', ROOT / 'bench' / 'model_table.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_writes_figure_and_says_untrained(tmp_path, capsys):
    out = tmp_path / 'demo.png'
    assert main(['--model', 'spformer_tiny_sp16_224', '--out', str(out)]) == 0
    text = capsys.readouterr().out
    assert 'UNTRAINED' in text
    assert 'top classes : not shown (untrained weights)' in text  # no class names from random weights
    assert 'GMACs' in text and '(1, 1000)' in text
    assert text.count('superpixel segments used of 14x14 = 196 tokens') == 2  # one line per stage
    assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert 20_000 < out.stat().st_size < 3_000_000

    from PIL import Image
    w, h = Image.open(out).size
    assert w > 400 and h > 400


def test_demo_rejects_unknown_model_and_models_without_superpixels(tmp_path):
    with pytest.raises(SystemExit, match=r"--model 'spformer_tiny': no such file or folder, and not a registered "
                                         r"model \(did you mean spformer_tiny_sp16_224"):
        main(['--model', 'spformer_tiny', '--out', str(tmp_path / 'x.png')])
    import timm
    from safetensors.torch import save_file
    save_file(timm.create_model('test_vit').state_dict(), str(tmp_path / 'vit.safetensors'))  # no download
    with pytest.raises(SystemExit, match="is a VisionTransformer, which makes no superpixels; expected an SPFormer"):
        main(['--model', f'test_vit={tmp_path / "vit.safetensors"}', '--out', str(tmp_path / 'x.png')])


def test_weights_source():
    assert weights_source(dict(url='', hf_hub_id=None)) is None
    assert weights_source(dict(url='', file='w.safetensors')) == 'file=w.safetensors'
    assert weights_source(dict(hf_hub_id='timm/x')) == 'hf_hub_id=timm/x'


def test_superpixel_boundaries_marks_label_edges():
    image = np.zeros((8, 8, 3), np.uint8)
    labels = np.zeros((8, 8), np.int64)
    labels[:, 4:] = 1
    drawn = superpixel_boundaries(image, labels, color=(1, 0, 0))
    assert drawn.dtype == np.uint8 and drawn.shape == image.shape
    red = (drawn[..., 0] == 255) & (drawn[..., 1] == 0)
    assert red[:, 3:5].any(axis=1).all()  # a boundary in every row, between the two labels
    assert not red[:, :3].any() and not red[:, 5:].any()


def test_stage_labels_per_head_matches_own_cell_on_ties():
    # Uniform association: every argmax is a tie, so every pixel stays in its own cell and the
    # per-head maps equal the regular grid (cell 2 on a 4x4 pixel stream, upsampled x4 to 16x16).
    B, M, h, w, cell, up = 1, 2, 2, 2, 2, 4
    assoc = torch.full((B, M, 9, h * cell, w * cell), 1 / 9)
    grid = (torch.arange(16)[:, None] // (cell * up)) * w + torch.arange(16)[None, :] // (cell * up)
    stage = dict(association=assoc, labels=grid[None], grid=torch.tensor([h, w]))
    merged, heads = stage_labels(stage)
    assert len(heads) == M
    for head in heads:
        assert torch.equal(head[0], grid)


def test_readme_table_replacement():
    mt = _load_model_table()
    readme = f'# title\n\nintro\n\n{mt.START}\nold table\nmore\n{mt.END}\n\n## next\ntext\n'
    new = mt.replace_between_markers(readme, '| a | b |\n|---|---|\n')
    assert new == f'# title\n\nintro\n\n{mt.START}\n| a | b |\n|---|---|\n{mt.END}\n\n## next\ntext\n'
    assert mt.replace_between_markers(new, '| a | b |\n|---|---|') == new  # idempotent
    with pytest.raises(ValueError, match='exactly once'):
        mt.replace_between_markers('no markers here', 'x')
    with pytest.raises(ValueError, match='before'):
        mt.replace_between_markers(f'{mt.END}\n{mt.START}\n', 'x')
