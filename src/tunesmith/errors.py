"""The one exception type for mistakes a user can fix.

Its message names the file, line or field at fault and says what to do; the CLI prints it without a
traceback. Programming errors stay ordinary exceptions so that they are never mistaken for user input.
"""


class TunesmithError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint; the CLI exits 128 + signal."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        super().__init__(f"interrupted by signal {signum} after step {step}")
        self.signum = signum
        self.step = step
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
