"""The one exception type for mistakes a user can fix.

Its message names the file, line or field at fault and says what to do; the CLI prints it without a
traceback. Programming errors stay ordinary exceptions so that they are never mistaken for user input.
"""


class TunesmithError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""
