"""Several runners on one plan (one per GPU, docs/distributed.md): the claims beside a results file.

A runner claims a planned run before training it, under a lock on the results file, and releases the
claim when the run is recorded or fails; the claims file (`RESULTS.claims.json`) names each claimed
run's host and process. A claim from this host whose process is gone (killed, crashed) is dropped, so
that its run is taken again; another host's claim stands, since only that host can say.
"""

from __future__ import annotations

import json
import os
import platform
from contextlib import AbstractContextManager
from pathlib import Path

from .errors import CCFLLMError
from .io import file_lock, write_json


def results_lock(results: Path) -> AbstractContextManager:
    """The lock every reader-then-writer of the results file and its claims holds."""
    return file_lock(_beside(results, ".lock"))


def live_claims(results: Path) -> dict[str, dict]:
    """The runs other runners have claimed and still run, by run key."""
    path = _claims_file(results)
    try:
        claims = json.loads(path.read_text()) if path.exists() else {}
        return {key: owner for key, owner in claims.items() if _alive(owner["host"], int(owner["pid"]))}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CCFLLMError(
            f"{path} is not a readable claims file ({exc!r}); with no runner running on this plan, "
            "delete it and start again (every finished run is kept in the results file)."
        ) from exc


def claim(results: Path, key: str, claims: dict[str, dict]) -> None:
    """Claim `key` for this process; the caller holds results_lock and read `claims` under it."""
    write_json(_claims_file(results), {**claims, key: {"host": platform.node(), "pid": os.getpid()}})


def release(results: Path, key: str) -> None:
    with results_lock(results):
        claims = live_claims(results)
        claims.pop(key, None)
        write_json(_claims_file(results), claims)


def _beside(results: Path, suffix: str) -> Path:
    return results.with_name(results.name + suffix)


def _claims_file(results: Path) -> Path:
    return _beside(results, ".claims.json")


def _alive(host: str, pid: int) -> bool:
    if host != platform.node():
        return True  # another machine's runner: only it can say
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there is such a process, another user's
        pass
    return True
