"""spformer-hub: publish SPFormer classifiers and SP-Transformer segmenters to the Hugging Face Hub, and fetch them.

    spformer-hub push OUTPUT_FOLDER --repo-id ORG/NAME [--private] [--revision R] [--weights {best,model,ema}]
    spformer-hub push model.safetensors --model spformer_tiny_sp16_224 --repo-id ORG/NAME
    spformer-hub push model.safetensors --model sp_transformer_r50_cityscapes --repo-id ORG/NAME
    spformer-hub export OUTPUT_FOLDER OUT_DIR           # the folder push would commit, without pushing
    spformer-hub download ORG/NAME [--revision R]       # into the Hub cache; prints the snapshot path
    python -m spformer.hub.cli --help

A training output folder (train_imagenet.py's or train_segmentation.py's ``final/``) holds
``config.json`` and ``model.safetensors`` (timm ``save_for_hf``), and optionally ``model_ema.safetensors``,
``train_config.yaml`` and ``results.json`` (both go into the model card, without local paths). Of the
weights and their EMA, the one that validated better (``results.json``) is published, and the command and
the card say which and why; ``--weights model`` or ``--weights ema`` choose. The token is ``--token``,
else ``HF_TOKEN`` or the one saved by ``hf auth login``.

Errors you can fix (a bad checkpoint, argument or --sample-image, an output folder that is a file, a
Hub refusal) print one line ``spformer-hub COMMAND: ...`` and exit with status 1; set SPFORMER_DEBUG=1
for the traceback (SPFORMER_HUB_DEBUG=1, its older name, works too). --sample-image and the export
folder are checked before the model is loaded.
"""
import argparse
import json
import pathlib
import sys
from typing import List, Optional

__all__ = ['main']


def _label_names(path: Optional[str]) -> Optional[List[str]]:
    """A JSON list, or a text file with one name per line."""
    if path is None:
        return None
    from spformer.cli import ArgumentError
    try:
        text = pathlib.Path(path).read_text()
    except OSError as e:
        raise ArgumentError(f"--label-names '{path}': {e.strerror or e}") from e
    if path.endswith('.json'):
        names = json.loads(text)
        if not isinstance(names, list):
            raise ValueError(f'--label-names {path}: expected a JSON list of names, got {type(names).__name__}')
        return names
    return [line.strip() for line in text.splitlines() if line.strip()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='spformer-hub', description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n'.join(__doc__.split('\n')[2:]))
    sub = p.add_subparsers(dest='command', required=True)

    def source_args(q):
        q.add_argument('checkpoint', help='training output folder, or one .safetensors file (with --model)')
        q.add_argument('--model', default=None, help='SPFormer or SP-Transformer variant of a .safetensors file '
                                                     '(for a folder: the variant its config.json must name)')
        q.add_argument('--weights', choices=['best', 'model', 'ema'], default='best',
                       help="for a training folder: 'best' publishes the better-validating of model.safetensors and "
                            "model_ema.safetensors (results.json), 'model' or 'ema' that file (default: best)")
        q.add_argument('--no-ema', dest='weights', action='store_const', const='model',
                       help='the same as --weights model')
        q.add_argument('--label-names', default=None, metavar='FILE',
                       help='class names: a JSON list or one name per line')
        q.add_argument('--dataset', action='append', default=None, metavar='ID',
                       help='Hub dataset id for the card (repeatable; default from train_config.yaml)')
        q.add_argument('--sample-image', default=None, metavar='PATH',
                       help="image for the picture of superpixels (and a segmenter's classes) (default: "
                            "scikit-image's astronaut)")

    from spformer.cli import DEBUG_HELP
    push = sub.add_parser('push', help='publish a checkpoint to a Hub repo (one commit)', epilog=DEBUG_HELP)
    source_args(push)
    push.add_argument('--repo-id', required=True, help='ORG/NAME (created if missing)')
    push.add_argument('--private', action='store_true', help='create the repo private')
    push.add_argument('--revision', default=None, help='branch to commit to (created if missing; default main)')
    push.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or the saved login)')
    push.add_argument('--commit-message', default=None)

    export = sub.add_parser('export', help='write the folder push would commit, without pushing', epilog=DEBUG_HELP)
    source_args(export)
    export.add_argument('out', metavar='OUT_DIR', help='output folder')
    export.add_argument('--repo-id', default=None, help='ORG/NAME for the usage block of the card')

    download = sub.add_parser('download', help='fetch a published model into the Hub cache and print its path',
                              epilog=DEBUG_HELP)
    download.add_argument('repo_id', help='ORG/NAME')
    download.add_argument('--revision', default=None)
    download.add_argument('--cache-dir', default=None, help='default: the Hub cache (HF_HOME, HF_HUB_CACHE)')
    download.add_argument('--token', default=None)
    return p


def _check_sample_image(path: Optional[str]) -> None:
    """Read --sample-image now (spformer.images), so a bad one is named before any model is loaded or pushed."""
    if path is None:
        return
    from spformer.images import ImageReadError, open_rgb
    try:
        open_rgb(path)
    except ImageReadError as e:
        raise ImageReadError(f'--sample-image: {e}', e.path, e.reason) from e


def _run(args) -> int:
    from spformer.cli import check_output_dir
    from .checkpoint import CONFIG_NAME, WEIGHTS_NAME, read_checkpoint_folder
    from .publish import PUBLISHED_FILES, _load_source, push_to_hub, save_pretrained

    if args.command in ('push', 'export'):  # the cheap checks, before a model is loaded or a repo created
        if args.command == 'export':
            check_output_dir(args.out, 'OUT_DIR')
        _check_sample_image(args.sample_image)
        label_names = _label_names(args.label_names)
    if args.command == 'push':
        ema = None if args.weights == 'best' else args.weights == 'ema'
        if pathlib.Path(args.checkpoint).is_dir():  # say which weights go out before the upload starts
            choice = read_checkpoint_folder(args.checkpoint).choose(ema)
            print(f'weights : {pathlib.Path(args.checkpoint) / choice.file_name}: {choice.reason}')
        url = push_to_hub(
            args.checkpoint, args.repo_id, private=args.private, revision=args.revision, token=args.token,
            commit_message=args.commit_message, label_names=label_names,
            ema=ema, model_name=args.model, datasets=args.dataset, sample_image=args.sample_image)
        print(url)
        return 0
    if args.command == 'export':
        ema = None if args.weights == 'best' else args.weights == 'ema'
        model, found = _load_source(args.checkpoint, ema=ema, model_name=args.model)
        reason = found.get('weights_reason') or found.get('weights_note')
        print(f'weights : {found["weights_file"]}' + (f': {reason}' if reason else ''))
        out = save_pretrained(
            model, args.out, label_names=label_names if label_names is not None else found.get('label_names'),
            train_config=found.get('train_config'), metrics=found.get('metrics'), sample_image=args.sample_image,
            datasets=args.dataset, ema=found.get('ema', False), weights_note=found.get('weights_note'),
            repo_id=args.repo_id)
        print(out)
        return 0
    # download
    from huggingface_hub import snapshot_download
    path = pathlib.Path(snapshot_download(
        args.repo_id, revision=args.revision, cache_dir=args.cache_dir, token=args.token,
        allow_patterns=list(PUBLISHED_FILES)))  # safetensors and metadata only: no pickles
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f'{args.repo_id} has no {" or ".join(missing)}: not a published SPFormer or '
                                f'SP-Transformer (pickled weights are not downloaded)')
    print(path)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
    from spformer.cli import run_main
    # Bad input (ValueError/TypeError: refused checkpoints, label names, repo ids) and Hub refusals: one line,
    # not a traceback (SPFORMER_DEBUG=1 for one), as in the other spformer scripts.
    return run_main(f'spformer-hub {args.command}', _run, args,
                    expected=(ValueError, TypeError, HfHubHTTPError, OfflineModeIsEnabled))


if __name__ == '__main__':
    sys.exit(main())
