"""Entry point: `python -m dinov2_jax.main --config=configs/NAME.py[:arg] --workdir=DIR`.

Parses flags and the config, starts multi-host JAX when the environment asks for it, and hands
off to `dinov2_jax.train.loop.train` with the run's evaluations (`dinov2_jax.eval`) as its
callback. `--config.key=value` overrides any config entry. The console shows the run's own
lines and warnings; `--verbosity=0` adds every library's INFO log (orbax's checkpoint steps,
for one). A config error prints one line and exits 1; any other error keeps its traceback.
"""
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from dinov2_jax import cli, parallel
from dinov2_jax.eval import during_training
from dinov2_jax.train import checkpoint, loop


def _define(flag_values):
    config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/vitl14.py[:smoke]",
                                    lock_config=True, flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "run directory (local or gs://): config, "
                        "metrics.jsonl, checkpoints", flag_values=flag_values, required=True)
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "multi-host: index of this process",
                         flag_values=flag_values)
    flags.DEFINE_integer("verbosity", logging.WARNING, "log level: 0 = INFO, -1 = WARNING",
                         flag_values=flag_values)


def main(argv):
    flag_values = cli.parse(argv, _define, __doc__)
    if flag_values.config is None:
        raise cli.ConfigError("--config is required (see --help)")
    logging.set_verbosity(flag_values.verbosity)
    parallel.initialize_distributed(flag_values.coordinator_address,
                                    flag_values.num_processes, flag_values.process_id)
    config = flag_values.config
    try:
        loop.train(config, flag_values.workdir, during_training.make_evaluator(config))
    except (loop.DivergenceError, loop.CollapseError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except checkpoint.DiskFullError as error:
        # The intact checkpoints are on disk; orbax's threads still hold failing writes, and
        # an orderly interpreter exit would print a traceback for each of them.
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    cli.run(main)
