"""Entry point: `python -m dinov2_jax.main --config=configs/NAME.py[:arg] --workdir=DIR`.

Parses flags and the config, starts multi-host JAX when the environment asks for it, and hands
off to `dinov2_jax.train.loop.train`. `--config.key=value` overrides any config entry.
The console shows the run's own lines and warnings; `--verbosity=0` adds every library's
INFO log (orbax's checkpoint steps, for one).
"""
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from dinov2_jax import configs, parallel
from dinov2_jax.train import loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "recipe file, e.g. configs/vitl14.py[:smoke]",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "run directory: config, metrics.jsonl, checkpoints")
flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                    FLAGS.process_id)
    try:
        loop.train(FLAGS.config, FLAGS.workdir)
    except (ValueError, loop.DivergenceError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
