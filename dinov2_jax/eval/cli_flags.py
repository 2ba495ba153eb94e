"""Command-line pieces the evaluation CLIs and the features CLI share (`dinov2_jax.cli` flags).

`define_model_flags` declares the backbone flags (--weights, --arch, --network, --student,
--interpolation, --dtype, --size, --batch_size, --num_workers) on a CLI's fresh FlagValues,
`define_eval_flags` adds --resize_size and --output (a results JSON file),
`define_source_flags` the data sources;
`load_model` reads the backbone the flags name, `number_list` parses a comma-separated flag,
and `report` prints results and writes them with the run's context.
"""
import json
import sys

from absl import flags
from etils import epath

from dinov2_jax import weights
from dinov2_jax.configs import ConfigError
from dinov2_jax.models import vit


def define_model_flags(flag_values, *, size=224, batch_size=256):
    """--weights, --arch, --network, --student, --interpolation, --dtype, --size, --batch_size,
    --num_workers."""
    flags.DEFINE_string("weights", None, "dinov2_jax weights dir, training workdir, or torch "
                        ".pth/.safetensors file", required=True, flag_values=flag_values)
    flags.DEFINE_string("arch", None, "hub name (vits14, vitl14_reg, ...) or size (vit_large); "
                        "torch files only", flag_values=flag_values)
    flags.DEFINE_enum("network", None, weights.ALL_NETWORKS, "network of a training workdir "
                      "(default: the run's final model)", flag_values=flag_values)
    flags.DEFINE_string("student", None, "student name of a multi-student distillation run",
                        flag_values=flag_values)
    flags.DEFINE_enum("interpolation", None, sorted(vit.EXPORT_INTERPOLATIONS),
                      "resize the position embedding as this export target does (default: as "
                      "the model was trained), to reproduce an exported model's features at "
                      "other input sizes", flag_values=flag_values)
    flags.DEFINE_enum("dtype", "float32", vit.DTYPES, "compute dtype of the backbone",
                      flag_values=flag_values)
    flags.DEFINE_integer("size", size, "center-crop size in pixels (a multiple of the patch "
                         "size)", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", batch_size, "images per forward", lower_bound=1,
                         flag_values=flag_values)
    flags.DEFINE_integer("num_workers", 0, "image decoding processes", lower_bound=0,
                         flag_values=flag_values)


def define_eval_flags(flag_values):
    """The eval CLIs' flags: the model flags, --resize_size and --output."""
    define_model_flags(flag_values)
    flags.DEFINE_integer("resize_size", None, "short side before the crop (default "
                         "size*256/224)", flag_values=flag_values)
    flags.DEFINE_string("output", None, "results JSON file", flag_values=flag_values)


def define_source_flags(flag_values, **helps):
    """One required data-source flag per keyword, e.g. train="labelled source of ..."."""
    for name, help_text in helps.items():
        flags.DEFINE_string(name, None, help_text, required=True, flag_values=flag_values)


def load_model(flag_values):
    """(model, params) named by --weights/--arch/--network; --size checked against the patch."""
    model, params = weights.load(flag_values.weights, flag_values.arch, flag_values.network,
                                   flag_values.student, flag_values.interpolation)
    if flag_values.size % model.patch_size:
        raise ConfigError(f"--size {flag_values.size} is not a multiple of the patch size "
                          f"{model.patch_size}")
    return model, params


def number_list(flag_values, name, kind=int):
    """The comma-separated numbers (`kind`: int or float) of flag `name`; a ConfigError naming
    the flag when they do not parse."""
    text = flag_values[name].value
    try:
        return tuple(kind(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--{name} must be comma-separated {kind.__name__} values, got "
                          f"{text!r}") from None


def report(results, flag_values, **context):
    """Prints `results` (a flat dict of floats) and writes them with context to --output."""
    width = max(len(name) for name in results)
    for name, value in results.items():
        print(f"{name:<{width}}  {value:.4f}" if isinstance(value, float)
              else f"{name:<{width}}  {value}")
    if flag_values.output:
        path = epath.Path(flag_values.output)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {"weights": flag_values.weights, "arch": flag_values.arch,
                  "size": flag_values.size, "dtype": flag_values.dtype, **context,
                  "results": results}
        path.write_text(json.dumps(record, indent=1))
        print(f"wrote {path}", file=sys.stderr)
