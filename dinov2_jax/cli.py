"""Command-line plumbing shared by every dinov2_jax CLI: absl flags built and parsed in `main`.

A CLI defines its flags on a fresh `flags.FlagValues` inside its `main(argv)` (through
`parse`), so importing any module defines no flag. `run(main)` is each CLI's `__main__`
entry: a `ConfigError` (a bad flag, config or input that the user named) prints as one
`error: ...` line and exits 1; every other exception keeps its traceback.
"""
import sys

from absl import flags

from dinov2_jax.errors import ConfigError


def parse(argv, define, description=""):
    """Flags that `define(flag_values)` declares, parsed from `argv` (argv[0] is the program).

    Returns the parsed `FlagValues`; positional arguments are refused. `--help` prints the
    flags and exits 0. A bad or missing flag raises `ConfigError` naming it.
    """
    argv = list(sys.argv if argv is None else argv)
    flag_values = flags.FlagValues()
    define(flag_values)
    if any(arg in ("-h", "--help", "-help") for arg in argv[1:]):
        print(f"{description}\n\nflags:\n{flag_values.get_help(include_special_flags=False)}")
        sys.exit(0)
    if not flags.FLAGS.is_parsed():  # libraries' own absl flags (Grain's workers read them)
        flags.FLAGS(argv[:1])
    try:
        rest = flag_values(argv)
    except flags.Error as error:
        raise ConfigError(f"{error} (see --help)") from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments {rest[1:]} (see --help)")
    return flag_values


def run(main, argv=None):
    """Runs `main(argv)`; a ConfigError prints one line and exits 1."""
    try:
        main(sys.argv if argv is None else argv)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
