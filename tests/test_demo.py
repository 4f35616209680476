"""spformer-demo end to end, the superpixel figure helpers, and the README table replacement of bench/model_table.py."""
import importlib.util
import pathlib

import numpy as np
import pytest
import timm
import torch

from spformer.demo import main
from spformer.hub.checkpoint import weights_source
from spformer.pictures import superpixel_boundaries

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
    # scale=4: drawn on the 4x nearest enlargement, the line as thin in output pixels (one pixel per row, beside
    # x = 16), the rest of the enlarged image untouched; a bad scale is named
    image[2, 1] = (10, 200, 30)
    big = superpixel_boundaries(image, labels, color=(1, 0, 0), scale=4)
    assert big.shape == (32, 32, 3)
    red = (big[..., 0] == 255) & (big[..., 1] == 0)
    assert red[:, 15:17].any(axis=1).all() and red.sum() == 32
    assert (big[8:12, 4:8] == (10, 200, 30)).all()
    with pytest.raises(ValueError, match='scale must be an int >= 1, got 0'):
        superpixel_boundaries(image, labels, scale=0)


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


def test_writing_a_table_into_a_page_without_markers_leaves_the_page_alone(tmp_path):
    """The benchmarks' --doc writer: the page is read, the text made, and only then the file opened for writing
    (opening first would truncate the page before the missing markers are noticed)."""
    mt = _load_model_table()
    page = tmp_path / 'page.md'
    page.write_text('# a page someone wrote\n\nno markers\n')
    with pytest.raises(ValueError, match='exactly once'):
        mt.write_between_markers(str(page), '| a |')
    assert page.read_text() == '# a page someone wrote\n\nno markers\n'
    page.write_text(f'x\n{mt.START}\nold\n{mt.END}\n')
    mt.write_between_markers(str(page), '| a |')
    assert page.read_text() == f'x\n{mt.START}\n| a |\n{mt.END}\n'


# ---------------------------------------------------------------------------------------------
# Errors a user can fix: one line naming the file or argument, before the model is built
# ---------------------------------------------------------------------------------------------

TINY = 'spformer_tiny_sp16_224'


@pytest.fixture
def no_model(monkeypatch):
    """Fails the test if the demo gets as far as building a model."""
    import spformer.demo

    def refuse(*args, **kwargs):
        raise AssertionError('the model was loaded before the cheap checks')
    monkeypatch.setattr(spformer.demo, 'load_model', refuse)


def _truncated_png(path):
    from PIL import Image
    from skimage.data import astronaut
    Image.fromarray(astronaut()[::4, ::4]).save(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return path


def test_demo_names_an_unreadable_image(tmp_path, no_model):
    image = _truncated_png(tmp_path / 'cut.png')
    with pytest.raises(SystemExit) as e:
        main(['--model', TINY, '--image', str(image), '--out', str(tmp_path / 'x.png')])
    assert str(e.value) == (f"spformer-demo: --image: cannot read image '{image}': truncated image data "
                            f"(image file is truncated)")
    (tmp_path / 'notes.jpg').write_text('not a picture')
    with pytest.raises(SystemExit, match=r"^spformer-demo: --image: cannot read image '.*notes.jpg': not an image"):
        main(['--model', TINY, '--image', str(tmp_path / 'notes.jpg'), '--out', str(tmp_path / 'x.png')])


def test_demo_names_an_out_it_cannot_write(tmp_path, no_model):
    (tmp_path / 'somefile.txt').write_text('x')
    out = tmp_path / 'somefile.txt' / 'x.png'
    with pytest.raises(SystemExit) as e:
        main(['--model', TINY, '--out', str(out)])
    assert str(e.value) == f"spformer-demo: --out '{out}': '{tmp_path / 'somefile.txt'}' is a file, not a folder"
    with pytest.raises(SystemExit, match=f"^spformer-demo: --out '{tmp_path}' is a folder; expected the path of a file"):
        main(['--model', TINY, '--out', str(tmp_path)])


def test_demo_reads_a_16bit_image_as_its_8bit_original(tmp_path):
    from PIL import Image
    from skimage.data import camera
    from spformer.demo import _load_image
    grey = camera()[::8, ::8]
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / 'grey16.png')  # PIL mode 'I;16'
    image, name = _load_image(str(tmp_path / 'grey16.png'))
    assert name == str(tmp_path / 'grey16.png') and image.mode == 'RGB'
    np.testing.assert_array_equal(np.asarray(image), np.repeat(grey[..., None], 3, axis=2))


@pytest.mark.parametrize('flags', [['--checkpoint', '{pth}'], ['--model', TINY + '={pth}']])
def test_demo_never_loads_a_pickle(tmp_path, monkeypatch, flags):
    import builtins
    import pickle

    class Trap:  # unpickling this writes the marker file: a pickle runs code when loaded
        def __reduce__(self):
            return builtins.open, (str(tmp_path / 'UNPICKLED'), 'w')
    pth = tmp_path / 'weights.pth'
    torch.save({'state_dict': timm.create_model('test_vit').state_dict(), 'trap': Trap()}, pth)

    def refuse(*args, **kwargs):
        raise AssertionError('a pickle was loaded')
    monkeypatch.setattr(torch, 'load', refuse)
    monkeypatch.setattr(pickle, 'load', refuse)
    monkeypatch.setattr(pickle, 'loads', refuse)
    argv = [f.format(pth=pth) for f in flags] + ['--out', str(tmp_path / 'x.png')]
    with pytest.raises(SystemExit) as e:
        main(argv)
    message = str(e.value)
    assert message.startswith(f'spformer-demo: {argv[0]} ') and f"'{pth}' is not a .safetensors weights file" in message
    assert 'pickled weights, .pth/.bin/.pt/..., are never loaded' in message
    assert not (tmp_path / 'UNPICKLED').exists()


def test_spformer_debug_shows_the_traceback(tmp_path, monkeypatch, no_model):
    from spformer.images import ImageReadError
    image = _truncated_png(tmp_path / 'cut.png')
    for name in ('SPFORMER_DEBUG', 'SPFORMER_HUB_DEBUG'):  # the second: spformer-hub's older name, still accepted
        monkeypatch.setenv(name, '1')
        with pytest.raises(ImageReadError, match=f"^--image: cannot read image '{image}': truncated") as e:
            main(['--model', TINY, '--image', str(image), '--out', str(tmp_path / 'x.png')])
        assert isinstance(e.value.__cause__, ImageReadError)  # down to PIL's own error, in the traceback
        monkeypatch.delenv(name)
    monkeypatch.setenv('SPFORMER_DEBUG', '0')  # 0 is off
    with pytest.raises(SystemExit):
        main(['--model', TINY, '--image', str(image), '--out', str(tmp_path / 'x.png')])


def test_help_documents_spformer_debug(capsys):
    with pytest.raises(SystemExit):
        main(['--help'])
    assert 'SPFORMER_DEBUG=1' in capsys.readouterr().out
