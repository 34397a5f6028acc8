"""Loading our own default models without transformers' progress bars and notices."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Iterator

__all__ = ["quiet_transformers"]


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside: no progress bars ("Loading weights", GGUF de-quantisation) and only errors from
    transformers' logger; anything else written to ``sys.stderr`` (the GGUF reader's own tqdm bar)
    is held back and shown only if the block raises. Everything is restored on exit, so a user's
    own settings are untouched. Used where tokenprune loads its shipped or offline models, whose
    notices say nothing the user can act on (a resized embedding row for the image token)."""
    from transformers.utils import logging

    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            yield
    except BaseException:
        sys.stderr.write(held.getvalue())
        raise
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()
