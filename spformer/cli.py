"""What the console scripts share: one line, not a traceback, for the errors a user can fix.

``spformer-demo``, ``spformer-visualize``, ``spformer-eval-superpixels`` and ``spformer-hub`` run their
work through :func:`run_main`. An expected error (an image that cannot be read, a bad argument or
dataset folder, a model reference that cannot be loaded, an output path that cannot be written, a
Hub refusal) ends the program with exit status 1 and one line ``PROG: message`` on stderr that names
the file or argument. With ``SPFORMER_DEBUG=1`` in the environment it is re-raised with its traceback
instead (``SPFORMER_HUB_DEBUG``, the older name of spformer-hub, is accepted too). Anything else is a
bug and always shows its traceback.

:func:`check_output_file` and :func:`check_output_dir` check an output path before the expensive work
(model loading, evaluation): a folder that is a file, or a file under a file, is named at once.
"""
import os
from typing import Callable, Optional, Sequence, Tuple, Type

from spformer.errors import UserError

__all__ = ['run_main', 'debug_enabled', 'check_output_file', 'check_output_dir', 'make_parent', 'ArgumentError',
           'OutputPathError', 'DEBUG_ENV', 'DEBUG_HELP']

DEBUG_ENV = 'SPFORMER_DEBUG'
_DEBUG_ALIASES = ('SPFORMER_HUB_DEBUG',)
DEBUG_HELP = (f'Errors you can fix (an unreadable image, a bad argument, dataset or output path, a model that '
              f'cannot be loaded) print one line that names the file or argument and exit with status 1; '
              f'set {DEBUG_ENV}=1 in the environment for the full traceback instead.')

# OSErrors about a path the user gave (an output file under a file, a folder where a file should be, ...)
_PATH_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError)


class ArgumentError(UserError):
    """A command-line argument that cannot be used: the message names it (printed as it is)."""


class OutputPathError(ArgumentError):
    """An output path that cannot be written: the message names the argument and the path."""


def debug_enabled() -> bool:
    """``SPFORMER_DEBUG`` (or ``SPFORMER_HUB_DEBUG``) is set to something other than '', 0, false, no or off."""
    for name in (DEBUG_ENV, *_DEBUG_ALIASES):
        if os.environ.get(name, '').strip().lower() not in ('', '0', 'false', 'no', 'off'):
            return True
    return False


def _message(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.filename is not None:
        names = f"'{error.filename}'" + (f" -> '{error.filename2}'" if error.filename2 is not None else '')
        return f'{names}: {error.strerror or type(error).__name__}'
    return f'{type(error).__name__}: {error}'


def run_main(prog: str, fn: Callable[..., int], *args, expected: Sequence[Type[BaseException]] = ()) -> int:
    """``fn(*args)``; an expected error becomes ``SystemExit('PROG: message')`` (stderr, exit status 1).

    Expected, printed as ``PROG: message``:

    - spformer's own errors, whose messages name the file or argument: every
      :class:`spformer.errors.UserError` (``ImageReadError``, :class:`ArgumentError` and its subclasses
      :class:`OutputPathError` and the evaluation's ``InputError``, ``DatasetError``,
      ``ModelReferenceError``);
    - errors of the file system about a path: FileNotFoundError, PermissionError, NotADirectoryError,
      IsADirectoryError, FileExistsError, or any OSError that names a file (printed as ``'path': reason``);
    - the classes in ``expected`` (spformer-hub: ValueError, TypeError and the Hub's HTTP errors), printed
      as ``TypeName: message``.

    With ``SPFORMER_DEBUG=1`` they are re-raised with their traceback; other exceptions always are.
    """
    try:
        return fn(*args)
    except Exception as e:
        if not _is_expected(e, tuple(expected)) or debug_enabled():
            raise
        raise SystemExit(f'{prog}: {_message(e)}') from None


def _is_expected(error: BaseException, expected: Tuple[Type[BaseException], ...]) -> bool:
    if isinstance(error, (UserError,) + _PATH_ERRORS + expected):
        return True
    return isinstance(error, OSError) and error.filename is not None


def _nearest_existing(path: str) -> str:
    """``path`` or the nearest of its parents that exists ('.' for a relative path with none)."""
    probe = os.path.normpath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent in ('', probe):
            return parent or '.'
        probe = parent
    return probe


def _check_folder_ancestry(folder: str, argument: str, path: str) -> None:
    existing = _nearest_existing(folder)
    if not os.path.isdir(existing):
        raise OutputPathError(f"{argument} '{path}': '{existing}' is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{argument} '{path}': permission denied: cannot write into '{existing}'")


def check_output_file(path: str, argument: str = '--out') -> str:
    """Check that a file can be written at ``path`` (missing parent folders may be created); returns ``path``.

    Raises:
        OutputPathError: ``path`` is a folder, a part of its folder is a file, or that folder is not writable.
    """
    text = os.fspath(path)
    if os.path.isdir(text):
        raise OutputPathError(f"{argument} '{text}' is a folder; expected the path of a file to write")
    _check_folder_ancestry(os.path.dirname(text) or '.', argument, text)
    return text


def check_output_dir(path: str, argument: str = '--out-dir') -> str:
    """Check that ``path`` is, or can be made, a writable folder; returns ``path``.

    Raises:
        OutputPathError: ``path`` or one of its parents is a file, or the folder is not writable.
    """
    text = os.fspath(path)
    if os.path.exists(text) and not os.path.isdir(text):
        raise OutputPathError(f"{argument} '{text}' is a file, not a folder")
    _check_folder_ancestry(text, argument, text)
    return text


def make_parent(path: str) -> Optional[str]:
    """Create the folder of the output file ``path`` if it is missing; returns that folder (None: the cwd)."""
    folder = os.path.dirname(os.fspath(path))
    if folder:
        os.makedirs(folder, exist_ok=True)
    return folder or None
