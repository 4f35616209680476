"""SPFormer in the tools it is combined with (docs/elsewhere.md): ONNX (both exporters, run in onnxruntime),
torch.export with dynamic height and width, torch.jit.trace with grad enabled, FX features of the hierarchical
models at every index, fvcore's FLOP count.

Exporting costs tens of seconds on 2 cores, so the models are small: SPFormer-T at 64 px (the whole model), and
hierarchical models with fewer ViT blocks (``depths=(1, 2)``: every kind of layer still runs, the group block
included).
"""
import io
import warnings

import numpy as np
import onnxruntime
import pytest
import timm
import torch

import spformer  # noqa: F401  (registers the models and the ops)
from spformer.kernels import decomposed, functional

# the hierarchical models, small: 2 stages, the group block after the first of stage 2's two ViT blocks
SMALL_HIER = dict(depths=(1, 2), group_index=1, img_size=64, dynamic_img_size=True)


def _dims(stride: int = 32):
    """Dynamic height and width, multiples of ``stride``, for torch.export / torch.onnx.export."""
    Dim = torch.export.Dim
    return {'x': {2: Dim('rows', min=1, max=64) * stride, 3: Dim('cols', min=1, max=64) * stride}}


def _session(onnx_bytes: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # (its constant folding warns about CastLike nodes it leaves alone)
    return onnxruntime.InferenceSession(onnx_bytes, options, providers=['CPUExecutionProvider'])


def _check_onnx(model, onnx_bytes: bytes, sizes):
    session = _session(onnx_bytes)
    name = session.get_inputs()[0].name
    for batch, (H, W) in sizes:
        x = torch.randn(batch, 3, H, W)
        with torch.no_grad():
            expected = model(x)
        got = session.run(None, {name: x.numpy()})[0]
        assert got.shape == tuple(expected.shape)
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4, atol=1e-4, err_msg=f'{batch}x{H}x{W}')


@pytest.mark.parametrize('name, kwargs', [
    ('spformer_tiny_sp16_224', dict(img_size=64, dynamic_img_size=True)),
    ('spformer_hier_tiny_sp16_224', SMALL_HIER),
])
def test_onnx_export_dynamo_runs_in_onnxruntime(name, kwargs):
    """torch.onnx.export(dynamo=True) with dynamic batch, height and width: the custom ops become standard
    ONNX ops (kernels/decomposed.py), the file runs in onnxruntime at other sizes and equals eager."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).eval()
    dims = _dims()
    dims['x'][0] = torch.export.Dim('batch', min=1, max=16)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        program = torch.onnx.export(model, (torch.randn(2, 3, 64, 64),), dynamo=True, dynamic_shapes=dims,
                                    optimize=False, verbose=False)
    domains = {node.domain for node in program.model_proto.graph.node}
    assert not any('spformer' in d for d in domains), domains
    _check_onnx(model, program.model_proto.SerializeToString(), [(1, (64, 64)), (3, (96, 128))])


def test_onnx_export_torchscript_exporter():
    """The TorchScript-based exporter (dynamo=False) too, at the size it traced (it records sizes as constants)."""
    torch.manual_seed(0)
    model = timm.create_model('spformer_hier_tiny_sp16_224', num_classes=10, grouping='local', **SMALL_HIER).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), f, dynamo=False, input_names=['x'])
    _check_onnx(model, f.getvalue(), [(1, (64, 64))])


def test_torch_export_dynamic_size():
    """torch.export with dynamic height and width: one program, three sizes, equal to eager; no guard on the
    grid (the position embeddings are resampled in the graph). The custom ops stay custom ops: a saved
    program loads where spformer is imported."""
    torch.manual_seed(0)
    model = timm.create_model('spformer_hier_tiny_sp16_224', num_classes=10, grouping='local', **SMALL_HIER).eval()
    program = torch.export.export(model, (torch.randn(1, 3, 64, 64),), dynamic_shapes=_dims())
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for H, W in ((64, 64), (96, 160), (224, 224)):
        x = torch.randn(1, 3, H, W)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5, msg=f'{H}x{W}')


def test_exported_program_decompositions():
    """An ExportedProgram's custom ops decompose into standard ops (spformer.kernels.decomposed.decompositions)
    with the same outputs, probabilities included, in every head / layout configuration."""
    torch.manual_seed(0)
    table = decomposed.decompositions()
    for Mp, M, cells, bias in ((1, 2, False, True), (2, 2, True, False), (1, 3, True, True)):
        B, h, w, cell, d, dv = 2, 3, 4, 2, 5, 6
        shape = (B, Mp, h, w, cell * cell) if cells else (B, Mp, h * cell, w * cell)
        pixels, values = torch.randn(*shape, d, dtype=torch.float64), torch.randn(*shape, dv, dtype=torch.float64)
        q_s, k_s = torch.randn(B, M, h, w, d, dtype=torch.float64), torch.randn(B, M, h, w, d, dtype=torch.float64)
        v_s = torch.randn(B, M, h, w, dv, dtype=torch.float64)
        b = torch.randn(B, M, h, w, dtype=torch.float64) if bias else None
        for op, args in ((torch.ops.spformer.superpixel_attention.default, (q_s, pixels, values, cell, 0.4, False)),
                         (torch.ops.spformer.superpixel_attention.default, (q_s, pixels, pixels, cell, 0.4, True)),
                         (torch.ops.spformer.pixel_attention.default, (pixels, k_s, v_s, b, cell, 0.3))):
            expected = op(*args, 'torch', cells)
            got = table[op](*args, 'torch', cells)
            for e, g in zip(expected, got):
                torch.testing.assert_close(g, e, msg=f'{op} Mp={Mp} M={M} cells={cells}')
    model = timm.create_model('spformer_tiny_sp16_224', num_classes=10, depths=(1, 1), img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    program = torch.export.export(model, (x,)).run_decompositions(table)
    assert not [n for n in program.graph.nodes if 'spformer' in str(n.target)]
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-4, atol=1e-5)


def test_onnx_ops_are_the_torch_backend():
    """What ONNX export records for the public ops (kernels/decomposed.py) equals the torch backend, values and
    weights, for pixel tensors shared by the heads or not, both layouts, with and without bias."""
    torch.manual_seed(0)
    for Mp, M, cells, bias in ((1, 2, False, True), (2, 2, False, False), (1, 3, True, True), (3, 3, True, False)):
        B, h, w, cell, d, dv = 2, 3, 4, 3, 5, 7
        shape = (B, Mp, h, w, cell * cell) if cells else (B, Mp, h * cell, w * cell)
        layout = 'cells' if cells else 'image'
        q = torch.randn(*shape, d, dtype=torch.float64)
        k, v = torch.randn(B, M, h, w, d, dtype=torch.float64), torch.randn(B, M, h, w, dv, dtype=torch.float64)
        b = torch.randn(B, M, h, w, dtype=torch.float64) if bias else None
        expected = functional.pixel_attention(q, k, v, cell, 0.3, bias=b, return_weights=True, backend='torch',
                                              pixel_layout=layout)
        for e, g in zip(expected, decomposed.pixel_attention(q, k, v, b, cell, 0.3, cells)):
            torch.testing.assert_close(g, e)
        for logits in (False, True):
            torch.testing.assert_close(
                decomposed.superpixel_association(q, k, b, cell, 0.3, cells, logits=logits),
                functional.superpixel_association(q, k, cell, 0.3, bias=b, backend='torch', pixel_layout=layout,
                                                  logits=logits))
        values = torch.randn(*shape, dv, dtype=torch.float64)
        torch.testing.assert_close(
            decomposed.superpixel_attention(k, q, values, cell, 0.4, cells),
            functional.superpixel_attention(k, q, values, cell, 0.4, backend='reference', pixel_layout=layout))


def test_jit_trace_with_grad_enabled():
    """torch.jit.trace with grad enabled passes its own check (it traces again under torch.no_grad(): the model
    takes one path while traced, whatever the grad mode); the saved program runs where spformer is imported."""
    torch.manual_seed(0)
    model = timm.create_model('spformer_hier_tiny_sp16_224', num_classes=10, **SMALL_HIER).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        traced = torch.jit.trace(model, x)  # check_trace=True: raises if the re-trace differs
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('grouping', ['global', 'local'])
def test_fx_features_of_hierarchical_models_at_every_index(grouping):
    """features_only=True, feature_cls='fx' at every feature index (the groups, index 12 of the full models, are
    a graph node of the traced group block), in index order, equal to forward_intermediates in the modules'
    layouts (channels-last pixels, NLC tokens)."""
    torch.manual_seed(0)
    kwargs = dict(grouping=grouping, img_size=64)
    full = timm.create_model('spformer_hier_tiny_sp16_224', **kwargs).eval()
    indices = tuple(range(len(full.feature_info)))
    fx = timm.create_model('spformer_hier_tiny_sp16_224', features_only=True, feature_cls='fx', out_indices=indices,
                           **kwargs).eval()
    missing, _ = fx.load_state_dict({f'graph_module.{k}': v for k, v in full.state_dict().items()}, strict=False)
    assert not missing
    assert fx.feature_info.reduction() == [full.feature_info[i]['reduction'] for i in indices]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        feats = fx(x)
        _, expected = full.forward_intermediates(x)
    assert len(feats) == len(indices)
    for i, (got, want) in enumerate(zip(feats, expected)):
        got = got.permute(0, 3, 1, 2) if i == 0 else got.transpose(1, 2).reshape(want.shape)
        torch.testing.assert_close(got, want, msg=f'feature {i}')


@pytest.mark.parametrize('name', ['spformer_tiny_sp16_224', 'spformer_hier_small_local_sp16_224'])
def test_fvcore_counts_what_the_table_counts(name):
    """fvcore with spformer.flops' handles counts the multiply-accumulates of demo.count_macs (the README table:
    torch.utils.flop_counter); without them it misses the attention ops."""
    from fvcore.nn import FlopCountAnalysis
    from spformer.demo import count_macs
    from spformer.flops import flop_count_analysis
    model = timm.create_model(name, img_size=64).eval()
    x = torch.randn(1, 3, 64, 64)
    expected = count_macs(model, x)[0]
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        analysis = flop_count_analysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        counted = analysis.total()
        plain = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        by_operator = analysis.by_operator()
        plain.total()
        assert {'spformer::superpixel_attention', 'aten::scaled_dot_product_attention'} <= set(plain.unsupported_ops())
    assert counted == pytest.approx(expected, rel=1e-2)
    assert by_operator['superpixel_attention'] > 0 and by_operator['pixel_attention'] > 0
    assert by_operator['scaled_dot_product_attention'] > 0 and by_operator['baddbmm'] > 0
