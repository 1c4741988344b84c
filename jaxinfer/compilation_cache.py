"""The process-wide persistent XLA compilation cache the entry points set (`LLM`, the CLI, the
server): `set_compilation_cache(path)`.
"""

from __future__ import annotations

import os

import jax


def set_compilation_cache(path: str | None) -> str | None:
    """Points JAX's persistent compilation cache at `path`, or turns it off; returns the directory
    in use (None: off). The entry points call it (`LLM`, the CLI, the server): the cache is a
    process-wide JAX setting, so an engine never changes it behind its caller's back.

    Args:
      path: a directory; "" disables the cache (also after an earlier call enabled it); None: the
        JAXINFER_COMPILATION_CACHE environment variable, else ~/.cache/jaxinfer/xla.

    Only executables that took at least JAXINFER_COMPILATION_CACHE_MIN_SECS to compile are written
    (default 0.5: a model's steps, not the many small eager graphs; the test suite sets 0, so its
    subprocesses share every graph too).

    Raises:
      ValueError: the cache is on and JAXINFER_COMPILATION_CACHE_MIN_SECS is not a number of seconds >= 0.
    """
    from jax._src import compilation_cache  # reset_cache: JAX reads the setting once, then caches it

    if path is None:
        path = os.environ.get("JAXINFER_COMPILATION_CACHE",
                              os.path.join(os.path.expanduser("~"), ".cache", "jaxinfer", "xla"))
    if not path:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()
        return None
    min_secs = _min_compile_secs()  # (read only where the cache is on: turning it off needs no setting)
    os.makedirs(path, exist_ok=True)
    if (not jax.config.jax_enable_compilation_cache or jax.config.jax_compilation_cache_dir != path
            or jax.config.jax_persistent_cache_min_compile_time_secs != min_secs):
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_secs)
        compilation_cache.reset_cache()
    return path


def _min_compile_secs() -> float:
    """JAXINFER_COMPILATION_CACHE_MIN_SECS (default 0.5) as seconds; ValueError unless a number >= 0."""
    raw = os.environ.get("JAXINFER_COMPILATION_CACHE_MIN_SECS", "0.5")
    try:
        secs = float(raw)
    except ValueError:
        secs = float("nan")
    if not secs >= 0:  # (NaN too)
        raise ValueError(f"JAXINFER_COMPILATION_CACHE_MIN_SECS must be a number of seconds >= 0, got {raw!r}")
    return secs
