"""ImageNet training and fine-tuning of SPFormer with Accelerate (DeiT recipe) -- not written yet.

Planned as issue 4: ``accelerate launch train_imagenet.py --model spformer_small_sp16_224 --data-dir ...``.
Until then, any timm-based training loop can build the models with
``timm.create_model('spformer_small_sp16_224', drop_path_rate=0.1)`` after ``import spformer``.
"""
import sys


def main() -> int:
    print('train_imagenet.py is not implemented yet (issue 4). Meanwhile, any timm-based training loop '
          'can build spformer_* models with timm.create_model after `import spformer`.', file=sys.stderr)
    return 2


if __name__ == '__main__':
    sys.exit(main())
