"""``python -m spformer.eval``: the spformer-eval-superpixels command."""
import sys

from spformer.eval.cli import main

if __name__ == '__main__':
    sys.exit(main())
