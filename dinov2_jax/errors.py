"""The one user-error type: a setting, flag or input that the user named is wrong.

It lives apart from `configs` (which imports the model and mesh tables) so that the data
code, which runs in light worker processes, can raise it too. CLIs print it as one line.
"""


class ConfigError(ValueError):
    """A setting, flag or input named by the user is wrong; CLIs print it as one line."""
