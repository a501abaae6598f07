"""The one error type the CLI turns into a one-line message and exit code 2."""


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
