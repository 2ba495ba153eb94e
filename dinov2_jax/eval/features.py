"""Command line: cls, patch and register features of images, written to an .npz file.

  python -m dinov2_jax.eval.features --weights DIR|X.pth --arch ARCH --input PATH
      --output feats.npz [--size 224] [--batch_size N] [--dtype float32|bfloat16]
      [--interpolation hub|timm|hf]

--weights is a dinov2_jax weights dir, a training workdir, or a PyTorch .pth/.safetensors
(official hub, timm or HF layout; --arch, e.g. vitl14_reg, is needed for those).
--interpolation resizes the position embedding as that export target does, to reproduce the
features of a model exported there at input sizes other than its own (README, Weights).
--input is either
  - an image folder (searched recursively): each image goes through the reference's eval
    transform, short side resized to size*256/224 (bicubic), center crop to --size,
    ImageNet normalisation; unreadable files are skipped and reported;
  - a .npy float32 array (N, H, W, 3) of images already normalised, used as is (--size is
    not applied; H and W must be multiples of the patch size).
The file holds cls (N, D), patch (N, P, D), reg (N, R, D) for register models, index (N,)
(row of the input each line comes from) and, for a folder, paths (N,) relative to it.
"""
import io
import os
import sys

import numpy as np
from absl import flags
from etils import epath

from dinov2_jax import cli
from dinov2_jax.configs import ConfigError
from dinov2_jax.data import sources
from dinov2_jax.eval import cli_flags, extract


def _define(flag_values):
    cli_flags.define_model_flags(flag_values, batch_size=64)
    flags.DEFINE_string("input", None, "image folder or .npy (N, H, W, 3)", required=True,
                        flag_values=flag_values)
    flags.DEFINE_string("output", None, "output .npz file", required=True,
                        flag_values=flag_values)


def load_array(path, patch_size):
    """The (N, H, W, 3) float32 array of a .npy file (memory-mapped when local), checked."""
    path = epath.Path(path)
    if os.path.isfile(os.fspath(path)):
        images = np.load(os.fspath(path), mmap_mode="r")
    else:  # Not a local file (gs://...): read whole.
        images = np.load(io.BytesIO(path.read_bytes()))
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.float32:
        raise ConfigError(f"{path}: expected a float32 array (N, H, W, 3) of normalised "
                          f"images, got {images.dtype} {images.shape}")
    if images.shape[1] % patch_size or images.shape[2] % patch_size:
        raise ConfigError(f"{path}: image size {images.shape[1]}x{images.shape[2]} is not a "
                          f"multiple of the patch size {patch_size}")
    if not len(images):
        raise ConfigError(f"{path} holds no images")
    return images


def features_of_input(model, params, path, *, size=224, batch_size=64, dtype=None,
                      num_workers=0, progress=True):
    """The arrays the CLI writes, for an image folder or a .npy file at `path`."""
    names = ("cls", "patch", "reg") if model.num_register_tokens else ("cls", "patch")
    path = epath.Path(path)
    if path.is_dir():
        if size % model.patch_size:
            raise ConfigError(f"--size {size} is not a multiple of the patch size "
                              f"{model.patch_size}")
        source = sources.FolderSource(str(path))
        out = extract.extract_source(model, params, source, features=names, image_size=size,
                                     batch_size=batch_size, dtype=dtype,
                                     num_workers=num_workers, progress=progress, desc="images")
        paths = np.asarray([os.path.relpath(source.paths[i], source.root)
                            for i in out["index"]])
        skipped = len(source) - len(out["index"])
        if skipped:
            print(f"skipped {skipped} unreadable images of {len(source)}", file=sys.stderr)
        return {**{name: out[name] for name in names}, "index": out["index"], "paths": paths}
    if path.name.endswith(".npy") and path.is_file():
        images = load_array(path, model.patch_size)
        out = extract.extract(model, params, extract.array_batches(images, batch_size),
                              features=names, dtype=dtype, num_images=len(images),
                              progress=progress, desc="images")
        return {**{name: out[name] for name in names}, "index": out["index"]}
    raise ConfigError(f"--input {path} is neither an image folder nor a .npy file")


def main(argv=None):
    args = cli.parse(argv, _define, __doc__.splitlines()[0])
    model, params = cli_flags.load_model(args)
    arrays = features_of_input(model, params, args.input, size=args.size,
                               batch_size=args.batch_size, dtype=args.dtype,
                               num_workers=args.num_workers)
    output = epath.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("wb") as f:
        np.savez(f, **arrays)
    shapes = ", ".join(f"{name} {value.shape}" for name, value in arrays.items())
    print(f"wrote {output}: {shapes}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
