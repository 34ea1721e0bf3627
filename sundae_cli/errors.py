"""One error hierarchy for everything a user can get wrong or the run can hit.

Every error carries a one-line message and an optional hint that names the flag, key or
command that fixes it. The app boundary (`sundae_cli.app.main`) prints them as
`error: ...` / `hint: ...` and exits with `exit_code`; tracebacks appear only with
`--debug`.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class SundaeError(Exception):
    """Base of all errors that sundae reports to the user without a traceback."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class InputError(SundaeError):
    """Bad flags, arguments or files given by the user (exit code 2)."""

    exit_code = EXIT_BAD_INPUT


class RecipeError(InputError):
    """A recipe that cannot be read or does not validate; one line per problem."""

    def __init__(
        self, message: str, hint: str | None = None, problems: list[str] | None = None
    ) -> None:
        super().__init__(message, hint)
        self.problems = problems or []


class DataError(InputError):
    """Image folders, masks or latent files that cannot be used as given."""


class BackendError(InputError):
    """A backend that is unknown, duplicated or fails to import."""


class CheckpointError(InputError):
    """A run or checkpoint that is missing, partial or does not match."""


class TrainingError(SundaeError):
    """A training run that had to stop (for example a non-finite loss)."""


class Interrupted(SundaeError):
    """The user pressed Ctrl-C; work was saved where possible (exit code 130)."""

    exit_code = EXIT_INTERRUPTED
