"""The operating-system error behind a failed write, however the writing library reported it.

A full disk reaches Python as OSError(ENOSPC) from open()/write(), but torch.save reports it as a RuntimeError
about stream positions (with the OSError as its __context__ when it wrote to a Python file object, with nothing
when it wrote to a path), and safetensors as a SafetensorError whose text ends in "(os error 28)". `os_error`
finds the OSError in each case, so that a message can say "No space left on device" and name the path.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

_OS_ERROR = re.compile(r"os error (\d+)")
FULL_BELOW = 1 << 20  # bytes free under which a write that failed without saying why is taken for a full disk


def os_error(exc: BaseException, directory: str | Path | None = None) -> OSError | None:
    """The OSError that caused `exc`: exc itself, one in its __cause__ / __context__ chain, one a library named by
    number ("os error 28"), or, when `directory` is given and its file system has less than FULL_BELOW bytes
    free, ENOSPC; None when the failure was not the operating system's."""
    seen, e = set(), exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e
        found = _OS_ERROR.search(str(e))
        if found:
            number = int(found.group(1))
            return OSError(number, os.strerror(number))
        e = e.__cause__ or e.__context__
    if directory is not None:
        try:
            if shutil.disk_usage(directory).free < FULL_BELOW:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    return exc if isinstance(exc, OSError) else None


def describe(err: OSError, path: str | Path | None = None) -> str:
    """'<path>: <strerror>' (the error's own file name where it has one), e.g. 'run/x: No space left on device'."""
    where = err.filename if err.filename is not None else path
    what = err.strerror or str(err)
    return f"{where}: {what}" if where is not None else what
