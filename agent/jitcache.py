"""Location of the Numba cache that keeps compiled kernels between runs.

A service restarted without a cache compiles every kernel again, which takes seconds on
a gateway. The directory must be chosen before `agent.dsp` is imported, because Numba
binds each cached kernel to the directory in force when the kernel is defined.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


class CacheDirError(ValueError):
    """The Numba cache directory cannot be created or written."""


def use_cache_dir(path: str | os.PathLike[str]) -> Path:
    """Create `path` if needed and make Numba cache compiled kernels there."""
    if "agent.dsp._kernels" in sys.modules:
        raise RuntimeError("the Numba cache directory must be set before agent.dsp is imported")
    directory = Path(path).expanduser().resolve()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CacheDirError(f"Numba cache directory {directory} cannot be created ({exc.strerror}); "
                         "choose a writable directory such as the service's state directory") from exc
    if not os.access(directory, os.W_OK):
        raise CacheDirError(f"Numba cache directory {directory} is not writable; choose a writable directory")
    os.environ["NUMBA_CACHE_DIR"] = str(directory)
    if "numba" in sys.modules:
        import numba

        numba.config.CACHE_DIR = str(directory)
    return directory


def peek_cache_dir(config_path: str | os.PathLike[str]) -> str | None:
    """Return `[dsp] cache_dir` of a config file, resolved against its folder, or None.

    Reads only that key, so the cache can be set before the full config (which imports the
    DSP) is loaded. Any problem with the file is left for the full validation to report.
    """
    import tomllib

    try:
        data = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    dsp = data.get("dsp")
    value = dsp.get("cache_dir") if isinstance(dsp, dict) else None
    if not isinstance(value, str) or not value:
        return None
    return str(Path(config_path).parent / Path(value).expanduser())
