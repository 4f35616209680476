"""The base of the errors a user can fix: an unreadable image, a bad argument, dataset folder or output
path, a model reference that cannot be loaded. Their messages name the file or argument, what it got
and what it expects, so the console scripts print them as one line (:func:`spformer.cli.run_main`).

A leaf: every module that raises such an error imports it from here, and :mod:`spformer.cli` recognises
them by this class alone, without importing the modules that raise them.
"""

__all__ = ['UserError']


class UserError(ValueError):
    """An error the user can fix; its message names the file or argument (a ValueError, as before)."""
