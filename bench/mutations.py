"""Mutation check: plant plausible single bugs, one at a time, and see which the test suite catches.

    python bench/mutations.py                      # every mutation, each against its area's tests
    python bench/mutations.py --area metrics       # one area (model, training, metrics, readers, hub, images, segmentation)
    python bench/mutations.py --only model-pos-embed-twice --full   # against the whole default suite
    python bench/mutations.py --only ID --tests tests/test_hier.py   # a quick check against chosen tests
    python bench/mutations.py --list               # the catalogue, without running anything

Not part of the default test run (it runs the tests dozens of times: ~30-60 minutes for everything on 2
cores). For each mutation it copies the repository (tracked and untracked-not-ignored files) into a
temporary folder, applies one exact text replacement, and runs ``python -m pytest -x -q`` there on the
test files of the mutation's area (``AREAS``; ``--full``: the default suite), with the copy first on
``sys.path`` so that the copy's ``spformer``, ``spformer.kernels`` and ``spformer.hub`` are the ones
imported (in this process and in every console script the tests start). A mutation is *caught* when
pytest fails (or runs past ``--timeout``). Before any mutation the unmutated copy must pass the same tests,
or the run stops: a red baseline would make every mutation look caught.

Each mutation is an exact replacement of text that occurs exactly once in its file; one that no longer
matches (the code moved on) is reported as ``stale`` and counts as neither caught nor missed, so the
catalogue has to be kept up to date with the code. The report is a Markdown table per area and the kill
rate; ``--json FILE`` also writes the results.

The catalogue holds the bugs of the mutation audit in issue 20 (``issue20`` in their ids) and a wider
sample of the same kinds written afterwards. Add to it when a bug slips through review: a mutation that
survives is a test to write.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutation:
    id: str
    area: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    why: str  # the bug, as a reviewer would describe it


# The test files that guard each area. A mutation must be caught by the default suite; these subsets only
# make the check affordable (``--full`` runs everything).
AREAS: Dict[str, List[str]] = {
    'model': ['tests/test_model_oracle.py', 'tests/test_models.py', 'tests/test_hier.py',
              'tests/test_association_labels.py'],
    'training': ['tests/test_train_schedule.py', 'tests/test_train.py', 'tests/test_train_faults.py'],
    'metrics': ['tests/test_metrics.py', 'tests/test_superpixel_eval.py'],
    'readers': ['tests/test_datasets.py', 'tests/test_superpixel_eval.py', 'tests/test_images.py'],
    'images': ['tests/test_images.py', 'tests/test_datasets.py'],
    'hub': ['tests/test_hub.py', 'tests/test_walkthrough.py'],
    'segmentation': ['tests/test_sp_transformer.py', 'tests/test_train_segmentation.py', 'tests/test_hub_segmentation.py'],
}

MODEL = 'spformer/models/spformer.py'
METRICS = 'spformer/eval/metrics.py'
SEGMENTERS = 'spformer/eval/segmenters.py'
EVALUATION = 'spformer/eval/evaluation.py'
DATASETS = 'spformer/eval/datasets.py'
PRETRAINED = 'spformer/models/pretrained.py'
IMAGES = 'spformer/images.py'
CHECKPOINT = 'hub/checkpoint.py'
TRAIN = 'train_imagenet.py'
SEGMENTER = 'spformer/models/sp_transformer.py'

MUTATIONS: List[Mutation] = [
    # ---- model wiring ------------------------------------------------------------------------------------
    Mutation('model-issue20-unfold-reads-sca-pixels', 'model', MODEL,
             '            _, superpixels, association = self._stage_sca(stage, pixels, superpixels)',
             '            stage_pixels, superpixels, association = self._stage_sca(stage, pixels, superpixels)',
             'the stage-end pixel update adds to the SCA-updated pixels instead of the stage input pixels'),
    Mutation('model-issue20-pos-embed-twice', 'model', MODEL,
             '        return tokens + pos\n',
             '        return tokens + pos + pos\n',
             'the position embedding is added twice'),
    Mutation('model-issue20-unfold-first-association', 'model', MODEL,
             '            pixels, superpixels, association = self._run(sca, pixels, superpixels)\n',
             '            pixels, superpixels, a = self._run(sca, pixels, superpixels)\n'
             '            association = association or a\n',
             "the pixel update (and the reported superpixels) use the stage's first SCA iteration's "
             'association instead of its last'),
    Mutation('model-sca-scale-all-channels', 'model', MODEL,
             '        scale = (C_p // M) ** -0.5\n',
             '        scale = C_p ** -0.5\n',
             'SCA logits scaled by 1/sqrt(C_p) instead of 1/sqrt(head dim)'),
    Mutation('model-sca-residual-from-pos-conv', 'model', MODEL,
             '        superpixels = add_head_projections(superpixels, gathered, wv, gv, bv, self.sp_ls.gamma)',
             '        superpixels = add_head_projections(s, gathered, wv, gv, bv, self.sp_ls.gamma)',
             'the superpixel residual stream keeps the position-conv output S + DWConv(S) instead of S'),
    Mutation('model-sca-keys-wrong-norm-gamma', 'model', MODEL,
             '            keys = project_heads(k_s * gq * scale, wq).to(dt)',
             '            keys = project_heads(k_s * gk * scale, wq).to(dt)',
             "the pixel update's pixel queries use the key part of the LayerNorm weight"),
    Mutation('model-association-bias-dropped', 'model', MODEL,
             '        association = Association(x_hat, queries, (project_heads_bias(q_s, bk) * scale).to(dt))',
             '        association = Association(x_hat, queries, (project_heads_bias(q_s, bk) * 0).to(dt))',
             "the association drops the LayerNorm bias term <beta_k, q_s> (it cancels in the token update's "
             "softmax but not over a pixel's 9 superpixels)"),
    Mutation('model-merged-heads-mean', 'model', MODEL,
             '        norm = queries.shape[1] ** -0.5\n',
             '        norm = 1.0 / queries.shape[1]\n',
             'the head-merged association averages the logits instead of dividing their sum by sqrt(M)'),
    Mutation('model-unfold-no-norm', 'model', MODEL,
             '        v = split_heads(self.norm(self.proj(superpixels)), self.num_heads).to(association.pixels.dtype)',
             '        v = split_heads(self.proj(superpixels), self.num_heads).to(association.pixels.dtype)',
             "the pixel update's values skip their LayerNorm"),
    Mutation('model-sp-init-no-gelu', 'model', MODEL,
             '        x = self.act(self.norm(self.proj(pixels)))\n',
             '        x = self.norm(self.proj(pixels))\n',
             'the superpixel init drops its GELU on the plain-autograd path (CUDA, compile, autocast)'),
    Mutation('model-head-max-pool', 'model', MODEL,
             '            x = x.mean(dim=1)\n',
             '            x = x.amax(dim=1)\n',
             'the head pools the tokens by max instead of mean'),
    Mutation('model-dynamic-pos-embed-transposed', 'model', MODEL,
             '            pos = resample_abs_pos_embed(stage.pos_embed, new_size=grid, old_size=self.grid_size, '
             'num_prefix_tokens=0)',
             '            pos = resample_abs_pos_embed(stage.pos_embed, new_size=grid[::-1], old_size=self.grid_size, '
             'num_prefix_tokens=0).reshape(1, grid[0] * grid[1], -1)',
             'dynamic image size resamples the position embedding to the transposed grid'),
    Mutation('model-group-init-sum', 'model', MODEL,
             '        return superpixels.reshape(B, h // g, g, w // g, g, C).mean(dim=(2, 4))',
             '        return superpixels.reshape(B, h // g, g, w // g, g, C).sum(dim=(2, 4))',
             'group tokens start as the sum of their block of superpixel tokens instead of the mean'),
    Mutation('model-group-softmax-over-groups', 'model', MODEL,
             '        attn = softmax_fp32(logits, dim=-2).to(v.dtype)  # each group over all superpixels',
             '        attn = softmax_fp32(logits, dim=-1).to(v.dtype)  # each group over all superpixels',
             'global grouping normalizes over the groups instead of over the superpixels'),
    Mutation('model-ungroup-before-blocks', 'model', MODEL,
             '        groups = tokens.reshape(B, gh, gw, C)\n        return self._run(self.ungroup',
             '        tokens.reshape(B, gh, gw, C)\n        return self._run(self.ungroup',
             "the ungroup step reads the groups from before the group level's ViT blocks"),
    Mutation('model-group-block-last', 'model', MODEL,
             '        return list(self.blocks[:self.group_index]) + [self.group_block] + '
             'list(self.blocks[self.group_index:])',
             '        return list(self.blocks) + [self.group_block]',
             "the group block runs after all of the last stage's ViT blocks instead of after group_index of them"),
    Mutation('model-drop-path-reversed', 'model', MODEL,
             '        dpr = [drop_path_rate * i / (n_blocks - 1) if n_blocks > 1 else 0. for i in range(n_blocks)]',
             '        dpr = [drop_path_rate * (n_blocks - 1 - i) / (n_blocks - 1) if n_blocks > 1 else 0. '
             'for i in range(n_blocks)]',
             'stochastic depth falls over the blocks instead of rising'),
    Mutation('model-hard-groups-tie-to-argmax', 'model', MODEL,
             '    return torch.where(own_p >= superpixel_to_group.amax(dim=-1), own, best).reshape(B, K, h, w)',
             '    return best.reshape(B, K, h, w)',
             "a token's hard group ignores the tie rule (ties go to the first group, not the one it was pooled into)"),

    # ---- metrics -----------------------------------------------------------------------------------------
    Mutation('metrics-issue20-br-window-too-wide', 'metrics', METRICS,
             "        near = maximum_filter(near, size=2 * tolerance + 1, mode='constant', cval=False)",
             "        near = maximum_filter(near, size=2 * tolerance + 3, mode='constant', cval=False)",
             "boundary recall's tolerance window is one pixel too wide on each side"),
    Mutation('metrics-issue20-boundary-one-side-rows', 'metrics', METRICS,
             '    b[:-1, :] |= dy\n',
             '',
             'boundary_map marks only one side of horizontal boundaries'),
    Mutation('metrics-asa-max-per-region', 'metrics', METRICS,
             '    return float(table.max(axis=1).sum() / total) if total else math.nan',
             '    return float(table.max(axis=0).sum() / total) if total else math.nan',
             'ASA takes the best segment of every region instead of the best region of every segment'),
    Mutation('metrics-ue-whole-leak', 'metrics', METRICS,
             '    return float(np.minimum(table, size - table)[table > 0].sum() / total)',
             '    return float((size - table)[table > 0].sum() / total)',
             "UE charges a leaking segment its whole outside part instead of the smaller of inside and outside"),
    Mutation('metrics-br-wraps-around', 'metrics', METRICS,
             "        near = maximum_filter(near, size=2 * tolerance + 1, mode='constant', cval=False)",
             "        near = maximum_filter(near, size=2 * tolerance + 1, mode='wrap')",
             'boundary recall lets boundaries on one image border count for the opposite border'),
    Mutation('metrics-br-ignore-not-excluded', 'metrics', METRICS,
             '        gt_b &= gt != ignore_index\n',
             '        pass\n',
             'boundary recall counts pixels of the ignore label as ground-truth boundary pixels'),
    Mutation('metrics-br-divides-by-segment-boundaries', 'metrics', METRICS,
             '    return float((gt_b & near).sum() / total)',
             '    return float((gt_b & near).sum() / max(1, int(near.sum())))',
             "boundary recall divides by the segments' boundary pixels (a precision) instead of the ground truth's"),
    Mutation('metrics-compactness-no-border', 'metrics', METRICS,
             '        perimeter += np.bincount(border, minlength=n)\n',
             '        perimeter += 0 * np.bincount(border, minlength=n)\n',
             "compactness leaves the image border out of a segment's perimeter"),
    Mutation('metrics-compactness-unweighted', 'metrics', METRICS,
             '    return float((area / area.sum() * quotient).sum())',
             '    return float(quotient.mean())',
             'compactness averages the quotients unweighted instead of by segment area'),
    Mutation('metrics-miou-union-double-counts', 'metrics', METRICS,
             '    iou = [tp[c] / (truth[c] + pred[c] - tp[c]) for c in classes]',
             '    iou = [tp[c] / (truth[c] + pred[c]) for c in classes]',
             'IoU divides by |truth| + |prediction| (the intersection counted twice)'),
    Mutation('metrics-macc-over-predicted-classes', 'metrics', METRICS,
             '    acc = [tp[c] / truth[c] for c in classes if truth[c]]',
             '    acc = [tp[c] / max(1, truth[c]) for c in classes]',
             'mean accuracy also averages over classes that are only predicted'),
    Mutation('metrics-oracle-ties-to-largest', 'metrics', METRICS,
             '    majority = regions[table.argmax(axis=1)]',
             '    majority = regions[::-1][table[:, ::-1].argmax(axis=1)]',
             "the oracle labelling breaks a segment's majority tie to the largest label instead of the smallest"),
    Mutation('metrics-contingency-keeps-ignored', 'metrics', METRICS,
             '    keep = np.ones(gt.shape, bool) if ignore_index is None else gt != ignore_index',
             '    keep = np.ones(gt.shape, bool)',
             'ASA, UE and the oracle labelling count the ignore label as a region'),
    Mutation('metrics-first-human-only', 'metrics', EVALUATION,
             '            row[key] = _nanmean([s[key] for s in scores])',
             '            row[key] = scores[0][key]',
             'per-image scores take the first ground truth instead of the mean over all humans'),
    Mutation('metrics-resize-corner-sampling', 'metrics', SEGMENTERS,
             '    ys = ((np.arange(h) + 0.5) * H / h).astype(np.int64)',
             '    ys = (np.arange(h) * H / h).astype(np.int64)',
             'nearest resizing of label maps samples the top edge of each row instead of its centre'),
    # ---- dataset readers -----------------------------------------------------------------------------------
    Mutation('readers-issue20-bsds-first-human', 'readers', DATASETS,
             "        humans = np.atleast_1d(mat['groundTruth'])",
             "        humans = np.atleast_1d(mat['groundTruth'])[:1]",
             "BSDS500 keeps only the first human's segmentation"),
    Mutation('readers-issue20-voc-palette-as-grey', 'readers', DATASETS,
             '        return np.asarray(im).astype(np.int64)',
             "        return np.asarray(im.convert('L') if im.mode == 'P' else im).astype(np.int64)",
             'a palette label PNG is read through convert("L"): palette indices become grey levels'),
    Mutation('readers-bsds-boundaries-as-labels', 'readers', DATASETS,
             '        segmentations = [np.asarray(h.Segmentation).astype(np.int64) for h in humans]',
             '        segmentations = [np.asarray(h.Boundaries).astype(np.int64) for h in humans]',
             "BSDS500 reads the humans' boundary maps as their segmentations"),
    Mutation('readers-16bit-labels-wrap', 'readers', DATASETS,
             '        return np.asarray(im).astype(np.int64)',
             '        return np.asarray(im).astype(np.uint8).astype(np.int64)',
             '16-bit label PNGs wrap around at 256 labels'),
    Mutation('readers-voc-split-first-line-dropped', 'readers', DATASETS,
             '            names = [line.split()[0] for line in f if line.strip()]',
             '            names = [line.split()[0] for line in f if line.strip()][1:]',
             'the VOC split file loses its first image'),
    Mutation('readers-folder-labels-by-order', 'readers', DATASETS,
             "        return os.path.join(self.root, 'labels', f'{name}.png')",
             "        return os.path.join(self.root, 'labels', sorted(os.listdir(os.path.join(self.root, 'labels')))"
             "[self.names.index(name)])",
             "a plain folder pairs images and labels by sorted position instead of by name"),
    Mutation('readers-bsds-ignore-255', 'readers', DATASETS,
             '        super().__init__(root, names, split, ignore_index=None)',
             '        super().__init__(root, names, split, ignore_index=255)',
             'BSDS500 (segment ids, no ignore label) skips the pixels of segment 255'),
    # ---- the one image reader ------------------------------------------------------------------------------
    Mutation('images-16bit-clipped', 'images', IMAGES,
             '            grey = (values.astype(np.uint32) * 255 + 32767) // 65535',
             '            grey = np.minimum(values, 255)',
             '16-bit images are clipped at 255 instead of scaled by their full range'),
    Mutation('images-16bit-truncated', 'images', IMAGES,
             '            grey = (values.astype(np.uint32) * 255 + 32767) // 65535',
             '            grey = (values.astype(np.uint32) * 255) // 65535',
             '16-bit images are scaled with truncation instead of rounding'),
    Mutation('images-no-exif-orientation', 'images', IMAGES,
             '        image = ImageOps.exif_transpose(image)  # a copy',
             '        image = image.copy()  # a copy',
             'the EXIF orientation is ignored'),
    Mutation('images-alpha-on-black', 'images', IMAGES,
             "    white = Image.new('RGBA', rgba.size, (255, 255, 255, 255))",
             "    white = Image.new('RGBA', rgba.size, (0, 0, 0, 255))",
             'transparent pixels are composited on black instead of white'),
    Mutation('images-palette-transparency-ignored', 'images', IMAGES,
             "    if mode in _ALPHA_MODES or (mode in _KEYED_MODES and image.info.get('transparency') is not None):",
             '    if mode in _ALPHA_MODES:',
             "a palette or keyed image's transparent colour is kept as its colour"),
    # ---- hub -----------------------------------------------------------------------------------------------
    Mutation('hub-issue20-module-prefix-kept', 'hub', PRETRAINED,
             "    while key.startswith(('module.', '_orig_mod.')):",
             "    while key.startswith(('_orig_mod.',)):",
             "the state-dict key cleaner no longer strips 'module.' (a DDP checkpoint's head and grid are not found)"),
    Mutation('hub-inner-orig-mod-kept', 'hub', PRETRAINED,
             "    return key.replace('._orig_mod.', '.')",
             '    return key',
             "the state-dict key cleaner keeps a '._orig_mod.' inside a key (a compiled submodule)"),
    Mutation('hub-prefixes-in-fixed-order', 'hub', PRETRAINED,
             "    while key.startswith(('module.', '_orig_mod.')):\n        key = key.split('.', 1)[1]",
             "    for prefix in ('module.', '_orig_mod.'):\n        key = key[len(prefix):] if key.startswith(prefix) "
             "else key",
             "the wrappers' prefixes are stripped in one fixed order (torch.compile(DDP(m)) keeps 'module.')"),
    Mutation('hub-num-classes-from-in-features', 'hub', PRETRAINED,
             '    num_classes = head[0] if head is not None and len(head) == 2 else 0',
             '    num_classes = head[1] if head is not None and len(head) == 2 else 0',
             "the classifier's input width is taken for the number of classes"),
    Mutation('hub-ema-loss-tie-inverted', 'hub', CHECKPOINT,
             '        ema = loss_ema < loss\n',
             '        ema = loss_ema > loss\n',
             'at equal top-1 the weights with the higher validation loss are chosen'),
    Mutation('hub-full-tie-to-ema', 'hub', CHECKPOINT,
             "    return WeightsChoice(False, f'model and EMA weights validated equally",
             "    return WeightsChoice(True, f'model and EMA weights validated equally",
             'a full tie picks the EMA weights while the message says the model weights'),
    Mutation('hub-config-head-check-dropped', 'hub', PRETRAINED,
             "                found.get('num_classes', num_classes) == num_classes:",
             '                True:',
             "a config.json describing another head size is trusted for the file next to it"),

    Mutation('hub-pretrained-tag-kept', 'hub', CHECKPOINT,
             "    variant = name.split('.')[0]\n    registered = {prefix:",
             "    variant = name\n    registered = {prefix:",
             "a model name with a pretrained tag (spformer_small_sp16_224.TAG) is not recognised as its variant"),
    Mutation('hub-recorded-choice-inverted', 'hub', CHECKPOINT,
             "                return WeightsChoice(recorded == 'ema', reason",
             "                return WeightsChoice(recorded != 'ema', reason",
             "a folder's recorded selected_weights is read the wrong way round"),
    Mutation('hub-only-weights-file-wrong', 'hub', CHECKPOINT,
             '                ema = self.weights is None\n',
             '                ema = self.ema_weights is None\n',
             'a folder with only one weights file chooses the missing one'),
    Mutation('hub-explicit-choice-ignored', 'hub', CHECKPOINT,
             "        return WeightsChoice(bool(ema), f'{\"EMA\" if ema else \"model\"} weights, as asked')",
             "        return WeightsChoice(not ema, f'{\"EMA\" if ema else \"model\"} weights, as asked')",
             '--weights ema / ema=True loads the other file'),
    Mutation('hub-timm-head-from-in-features', 'hub', CHECKPOINT,
             "        kwargs['num_classes'] = overlay['num_classes'] = info.shapes[f'{classifier}.weight'][0]",
             "        kwargs['num_classes'] = overlay['num_classes'] = info.shapes[f'{classifier}.weight'][1]",
             "a non-SPFormer timm model's head size is read from the classifier's input width"),
    Mutation('hub-config-keeps-runtime-args', 'hub', 'hub/publish.py',
             "        config.get('model_args', {}).pop(key, None)",
             '        pass',
             "config.json keeps run-time arguments (attn_backend) of the model that was saved"),
    Mutation('hub-in1k-tag-for-any-1000-classes', 'hub', 'hub/publish.py',
             "    if config.get('num_classes') == 1000 and list(datasets)[:1] == ['imagenet-1k']:",
             "    if config.get('num_classes') == 1000:",
             'a 1000-class model trained on other data is tagged in1k'),
    Mutation('hub-label-names-length-unchecked', 'hub', 'hub/publish.py',
             '    if len(label_names) != num_classes:',
             '    if False:',
             'label names of another length than the head are published'),
    # SP-Transformer (issue 22 and its review)
    Mutation('seg-topk-per-batch', 'segmentation', SEGMENTER,
             '    loss = loss.masked_fill(~valid, -1.0).flatten(1)',
             '    loss = loss.masked_fill(~valid, -1.0).flatten()[None]',
             "the top-20 % pixels are chosen over the whole batch, not per image (deeplab2's rule)"),
    Mutation('seg-miou-absent-class-as-zero', 'segmentation', 'spformer/eval/segmentation_metrics.py',
             '    return tp / (c.sum(0) + c.sum(1) - tp)',
             '    return (tp / (c.sum(0) + c.sum(1) - tp)).nan_to_num(0.0)',
             'a class absent from ground truth and prediction counts as IoU 0 in the mIoU'),
    Mutation('seg-association-rounded-under-autocast', 'segmentation', SEGMENTER,
             '        with autocast_disabled(q.device.type):\n            logits = superpixel_association(',
             '        with torch.autocast(q.device.type, dtype=torch.bfloat16, enabled=torch.is_autocast_enabled('
             'q.device.type)):\n            logits = superpixel_association(',
             'the association logits are computed under the caller\'s bf16 autocast (rounded to bf16)'),
    Mutation('seg-groups-interleaved', 'segmentation', SEGMENTER,
             "            tokenizer=rf'^tokenizer\\.{index}',\n            blocks=rf'^blocks\\.{index}',",
             "            blocks=[(rf'^tokenizer\\.{index}', (1,)), (rf'^blocks\\.{index}', (3,))],",
             'layer-decay groups interleave tokenizer layers and blocks (the original group_matcher)'),
    Mutation('seg-spformer-pyramid-lost', 'segmentation', SEGMENTER,
             "(dict(feature_pyramid=True) if pyramid else {})",
             "{}",
             "an SPFormer backbone built with out_indices loses its feature pyramid (levels of the wrong strides)"),
    Mutation('seg-tokenizer-mlp-default-4', 'segmentation', SEGMENTER,
             '            tokenizer_mlp_ratio: float = 1.,',
             '            tokenizer_mlp_ratio: float = 4.,',
             "the tokenizer MLPs' default width changes without the documented sizes"),
    Mutation('seg-weights-file-grid-ignored', 'segmentation', PRETRAINED,
             '        grid = (queries[1], queries[2])',
             '        grid = None',
             "an SP-Transformer weights file loaded through timm gets the registered input size, its queries resampled"),
    Mutation('seg-palette-ignore-coloured', 'segmentation', 'spformer/pictures.py',
             '        colours[255] = IGNORE_COLOUR',
             '        pass',
             'the ignore label (255) is drawn in a class-like colour'),
    # ---- training ------------------------------------------------------------------------------------------
    Mutation('training-issue20-lr-per-epoch', 'training', TRAIN,
             '            scheduler.step_update(num_updates=state.update)',
             '            scheduler.step_update(num_updates=epoch * updates_per_epoch)',
             'the lr scheduler is stepped with epoch x updates_per_epoch: the lr moves once per epoch'),
    Mutation('training-issue20-augmentation-without-index', 'training', 'spformer/training/data.py',
             '        with seeded_rngs(self.seed, epoch, index):',
             '        with seeded_rngs(self.seed, epoch):',
             "each sample's augmentation is seeded by (seed, epoch) only: every image of an epoch gets the same crop"),
    Mutation('training-lr-scaled-by-process-batch', 'training', TRAIN,
             '        args.lr = args.lr_base * global_batch / args.lr_base_size',
             '        args.lr = args.lr_base * args.batch_size / args.lr_base_size',
             'the lr follows the per-process batch instead of the global batch'),
    Mutation('training-clip-grad-ignored', 'training', TRAIN,
             '                if accelerator.sync_gradients and args.clip_grad is not None:',
             '                if False and args.clip_grad is not None:',
             '--clip-grad is accepted but never applied'),
    Mutation('training-rng-not-restored', 'training', 'spformer/training/rng.py',
             '        torch.set_rng_state(torch_state)\n',
             '        pass\n',
             "loading a sample moves the training loop's torch RNG (drop path, Mixup draws depend on data loading)"),
    Mutation('training-same-order-every-epoch', 'training', 'spformer/training/data.py',
             'manual_seed(key_seed(self.seed, self.epoch))',
             'manual_seed(key_seed(self.seed, 0))',
             'the samples come in the same order every epoch'),
    Mutation('training-resume-skips-updates-not-batches', 'training', TRAIN,
             '            loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch)',
             '            loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch // args.grad_accum_steps)',
             'a resumed run skips as many batches as updates were made (wrong under gradient accumulation)'),
    Mutation('training-ema-step-per-epoch', 'training', TRAIN,
             '                model_ema.update(unwrapped, step=state.update)',
             '                model_ema.update(unwrapped, step=epoch)',
             "the EMA's warm-up counts epochs instead of updates"),
    Mutation('training-val-top1-is-top2', 'training', 'spformer/training/metrics.py',
             '        correct1 += hits[:, 0].sum().item()',
             '        correct1 += hits[:, :2].any(dim=1).sum().item()',
             'validation top-1 counts a hit in the top two'),
    Mutation('training-val-loss-smoothed', 'training', 'spformer/training/metrics.py',
             "        losses = nn.functional.cross_entropy(logits.float(), batch['label'], reduction='none')",
             "        losses = nn.functional.cross_entropy(logits.float(), batch['label'], reduction='none', "
             "label_smoothing=0.1)",
             'the validation loss uses label smoothing'),
    Mutation('training-smoothing-ignored-without-mixup', 'training', TRAIN,
             '        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)',
             '        criterion = nn.CrossEntropyLoss()',
             'label smoothing is ignored when Mixup/CutMix are off'),
    Mutation('training-warmup-lr-ignored', 'training', TRAIN,
             '        warmup_lr=args.warmup_lr, min_lr=args.min_lr, step_on_epochs=False',
             '        warmup_lr=0.0, min_lr=args.min_lr, step_on_epochs=False',
             '--warmup-lr is ignored (the warm-up starts at 0)'),
]


def _repository_files() -> List[str]:
    out = subprocess.run(['git', 'ls-files', '-co', '--exclude-standard'], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


def make_copy(dest: Path) -> None:
    """The repository's files in ``dest``, plus links that make ``dest`` importable as the package:
    ``spformer/kernels`` and ``spformer/hub`` (the package-dir mapping of pyproject.toml)."""
    for f in _repository_files():
        target = dest / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, target)
    for sub in ('kernels', 'hub'):
        (dest / 'spformer' / sub).symlink_to(Path('..') / sub)


def copy_environment(copy: Path) -> Dict[str, str]:
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([str(copy)] + ([env['PYTHONPATH']] if env.get('PYTHONPATH') else []))
    env.pop('PYTEST_ADDOPTS', None)
    return env


def check_copy_is_imported(copy: Path) -> None:
    code = 'import spformer, spformer.kernels, spformer.hub; print(spformer.__file__, spformer.kernels.__file__, ' \
           'spformer.hub.__file__)'
    out = subprocess.run([sys.executable, '-c', code], cwd=copy, env=copy_environment(copy), check=True,
                         capture_output=True, text=True).stdout.split()
    outside = [f for f in out if not Path(f).resolve().is_relative_to(copy.resolve())]
    if outside:
        sys.exit(f'the copy in {copy} is not what gets imported ({outside}): the mutations would not be tested')


def plant(mutation: Mutation, copy: Path) -> Optional[str]:
    """Plant one mutation in the copy; returns the file's original text (to restore), or None if the
    mutation's text no longer occurs exactly once."""
    path = copy / mutation.path
    original = path.read_text()
    if original.count(mutation.old) != 1:
        return None
    path.write_text(original.replace(mutation.old, mutation.new))
    return original


def run_tests(copy: Path, tests: List[str], timeout: float) -> Dict[str, object]:
    start = time.monotonic()
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=copy_environment(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(failed=True, seconds=time.monotonic() - start, detail=f'timed out after {timeout:.0f} s')
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(('FAILED', 'ERROR'))]
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-200:]
    return dict(failed=proc.returncode != 0, seconds=time.monotonic() - start,
                detail=(lines[0] if lines else summary)[:200])


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--area', choices=sorted(AREAS), action='append', help='only these areas (repeatable)')
    p.add_argument('--only', action='append', help='only the mutations with these ids (repeatable)')
    p.add_argument('--full', action='store_true', help="run the default suite instead of the area's test files")
    p.add_argument('--tests', nargs='+', metavar='PATH', help="run these test files (or node ids) instead of the area's")
    p.add_argument('--timeout', type=float, default=1200, help='seconds per test run; a run past it counts as caught')
    p.add_argument('--list', action='store_true', help='print the catalogue and exit')
    p.add_argument('--json', type=Path, help='also write the results to this file')
    args = p.parse_args(argv)

    chosen = [m for m in MUTATIONS if (not args.area or m.area in args.area) and (not args.only or m.id in args.only)]
    if args.only and len(chosen) != len(set(args.only)):
        known = {m.id for m in MUTATIONS}
        sys.exit(f'--only: unknown mutation ids {sorted(set(args.only) - known)}; see --list')
    if args.list:
        for m in chosen:
            print(f'{m.area:9s} {m.id:45s} {m.why}')
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix='spformer-mutations-') as tmp:
        copy = Path(tmp) / 'repo'
        make_copy(copy)
        check_copy_is_imported(copy)
        baselines = {}
        for area in dict.fromkeys(m.area for m in chosen):
            tests = args.tests or (None if args.full else [t for t in AREAS[area] if (copy / t).exists()])
            key = tuple(tests or ())
            if key not in baselines:
                base = run_tests(copy, list(key), args.timeout)
                print(f'baseline {area}: {"FAILED" if base["failed"] else "passes"} in {base["seconds"]:.0f} s',
                      flush=True)
                if base['failed']:
                    sys.exit(f'the unmutated tests fail ({base["detail"]}): fix them before checking mutations')
                baselines[key] = base
            for m in (m for m in chosen if m.area == area):
                original = plant(m, copy)
                if original is None:
                    results.append(dict(id=m.id, area=m.area, outcome='stale', seconds=0.0,
                                        detail=f'text not found exactly once in {m.path}', why=m.why))
                    print(f'  stale   {m.id}', flush=True)
                    continue
                try:
                    r = run_tests(copy, list(key), args.timeout)
                finally:
                    (copy / m.path).write_text(original)
                outcome = 'caught' if r['failed'] else 'MISSED'
                results.append(dict(id=m.id, area=m.area, outcome=outcome, seconds=round(r['seconds'], 1),
                                    detail=r['detail'], why=m.why))
                print(f'  {outcome:7s} {m.id} ({r["seconds"]:.0f} s) {r["detail"] if r["failed"] else ""}',
                      flush=True)

    print()
    for area in dict.fromkeys(r['area'] for r in results):
        rows = [r for r in results if r['area'] == area]
        counted = [r for r in rows if r['outcome'] != 'stale']
        caught = sum(r['outcome'] == 'caught' for r in counted)
        rate = f'{100 * caught / len(counted):.0f}%' if counted else 'n/a'
        print(f'### {area}: {caught} of {len(counted)} caught ({rate})\n')
        print('| mutation | outcome | first failing test |')
        print('|---|---|---|')
        for r in rows:
            print(f"| `{r['id']}` | {r['outcome']} | {r['detail'] if r['outcome'] == 'caught' else r['why']} |")
        print()
    counted = [r for r in results if r['outcome'] != 'stale']
    caught = sum(r['outcome'] == 'caught' for r in counted)
    print(f'all areas: {caught} of {len(counted)} caught'
          + (f' ({100 * caught / len(counted):.0f}%)' if counted else ''))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + '\n')
    return 0 if caught == len(counted) else 1


if __name__ == '__main__':
    sys.exit(main())
