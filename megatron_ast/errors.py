"""The one error type the CLI turns into a one-line message and exit code 2, and how that line is reported."""
import contextlib
import json
import os
import sys
import time

PREFIX = "megatron-ast: error: "


def report(msg: str) -> None:
    """Print the one-line error. Under torchrun also write it to the rank's error file: torchrun ends with its own
    exit 1 and a failure summary whatever a rank's exit code, and the summary then names this line instead of a
    link to torchrun's docs. The file is whole or absent: torchrun fails reading a cut one."""
    line = f"{PREFIX}{msg}"
    with contextlib.suppress(OSError, ValueError):  # stderr gone with the launcher: the rank must still end cleanly
        sys.stderr.write(line + "\n")  # one write: ranks sharing the launcher's pipe don't splice their lines
        sys.stderr.flush()
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        tmp = f"{path}.tmp-{os.getpid()}"
        data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
        try:
            with open(tmp, "w") as f:  # torchelastic's layout: it shows py_callstack as the rank's traceback
                json.dump(data, f)
            os.replace(tmp, path)
        except OSError:  # a full disk, say: the line above is the report; this copy is a courtesy to torchrun
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class UsageError(Exception):
    """Bad input from the user: the message names the problem and the fix. `cleanup`, when set, removes what a
    failed write left; on many ranks it runs after every rank has stopped (distributed.fail_every_rank)."""

    cleanup = None


def _tested_deepspeed() -> str:
    """The DeepSpeed range this install was tested with (setup.py's requirement, read back from the metadata)."""
    from importlib import metadata

    try:
        reqs = metadata.requires("megatron-ast") or []
    except metadata.PackageNotFoundError:
        reqs = []
    return next((r.split(";")[0].strip() for r in reqs if r.replace(" ", "").startswith("deepspeed")),
                "the deepspeed range in setup.py")


class DeepSpeedMismatch(UsageError):
    """An assumption about DeepSpeed's internals that does not hold in the installed DeepSpeed: AST would
    otherwise train something else silently (plain AdamW, or a master zeroed under the mask)."""

    def __init__(self, what: str):
        try:
            from deepspeed import __version__ as found
        except ImportError:
            found = "?"
        super().__init__(f"DeepSpeed {found}: {what}; megatron_ast is tested with {_tested_deepspeed()}")
