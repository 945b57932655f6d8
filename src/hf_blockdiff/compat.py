# Copyright 2026 The hf_blockdiff authors. Apache-2.0.
"""The differences between the transformers releases we support (5.17 to the newest 5.x), in one place.

Hub-portable: imports only torch and transformers. A converted checkpoint carries this file, so it must work on
whatever release the user runs, not only the one that converted it.

- transformers 5.24 renamed the cache argument of every ``forward`` from ``past_key_values`` to ``cache`` (the
  old name still works there, with a deprecation warning) and the ``ModelOutput`` field likewise; a
  ``ModelOutput`` subclass with a ``past_key_values`` field no longer constructs.
"""

from __future__ import annotations

import inspect
from functools import cache as _memoize


@_memoize
def cache_argument(forward) -> str:
    """The name under which ``forward`` (a stock model's ``forward``) takes the KV cache."""
    parameters = inspect.signature(forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def pop_cache(kwargs: dict):
    """Remove and return the cache from call kwargs, under either name (refusing both at once)."""
    old, new = kwargs.pop("past_key_values", None), kwargs.pop("cache", None)
    if old is not None and new is not None:
        raise ValueError("Pass the KV cache once: as `cache` or as `past_key_values`, not both.")
    return new if new is not None else old
