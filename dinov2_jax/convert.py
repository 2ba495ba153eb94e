"""Command line: PyTorch <-> JAX weights of the DINOv2 backbone (hub, timm, HF layouts).

    python -m dinov2_jax.convert --input X.pth --arch vitl14 --output DIR      # torch -> jax
    python -m dinov2_jax.convert --input DIR --output Y.pth --format hub|timm|hf  # jax -> torch

--input is a torch file (.pth/.safetensors: official hub, timm, Hugging Face or training
checkpoint layout; --arch names its size), a dinov2_jax weights dir, or a training workdir or
one of its checkpoints (--params teacher|student|student_ema picks the network, default the
run's final model: the EMA teacher, or a distillation run's EMA student; --student NAME picks
one of a multi-student run's students). A torch
input is written as a weights dir; anything else needs --format. Every layout is checked
strictly against the architecture: a missing, unexpected or mis-shaped key is an error that
names it. The files are `dinov2_jax.weights`, the key layouts `dinov2_jax.models.torch_layouts`.
"""
import sys

from absl import flags
from etils import epath

from dinov2_jax import cli, weights
from dinov2_jax.configs import ConfigError
from dinov2_jax.models import vit


def _define(flag_values):
    flags.DEFINE_string("input", None, "torch file (.pth/.safetensors), weights dir or workdir",
                        flag_values=flag_values)
    flags.DEFINE_string("output", None, "weights dir (torch -> jax) or torch file / HF dir",
                        flag_values=flag_values)
    flags.DEFINE_string("arch", None, f"one of {sorted(vit.HUB_MODELS)} (torch input only)",
                        flag_values=flag_values)
    flags.DEFINE_enum("format", None, weights.EXPORT_FORMATS, "export layout (jax -> torch)",
                      flag_values=flag_values)
    flags.DEFINE_enum("params", None, weights.ALL_NETWORKS, "network of a training checkpoint "
                      "(default: the run's final model)", flag_values=flag_values)
    flags.DEFINE_string("student", None, "student name of a multi-student distillation run",
                        flag_values=flag_values)


def main(argv=None):
    args = cli.parse(argv, _define, __doc__.splitlines()[0])
    if not args.input or not args.output:
        raise ConfigError("--input and --output are required (see --help)")
    if not epath.Path(args.input).exists():
        raise ConfigError(f"--input {args.input} does not exist")
    torch_input = epath.Path(args.input).is_file()
    if not torch_input and not args.format:
        raise ConfigError("--format is required to export to PyTorch")
    model, params = weights.load(args.input, args.arch, args.params, args.student)
    print(f"loaded {args.input}: {vit.count_params(params):,} parameters", file=sys.stderr)
    if args.format:
        weights.export(model, params, args.output, args.format)
        print(f"{args.format}: {vit.export_agreement(model, args.format)}", file=sys.stderr)
    else:
        weights.save(args.output, model, params)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
