"""Command line: cls, patch and register features of images, written to an .npz file.

  python -m dinov2_jax.features --weights DIR|X.pth --arch ARCH --input PATH --output feats.npz
      [--size 224] [--batch-size N] [--dtype float32|bfloat16]

--weights is a dinov2_jax weights dir, a training workdir, or a PyTorch .pth/.safetensors
(official hub, timm or HF layout; --arch, e.g. vitl14_reg, is needed for those).
--input is either
  - an image folder (searched recursively): each image goes through the reference's eval
    transform, short side resized to size*256/224 (bicubic), center crop to --size,
    ImageNet normalisation; unreadable files are skipped and reported;
  - a .npy float32 array (N, H, W, 3) of images already normalised, used as is (--size is
    not applied; H and W must be multiples of the patch size).
The file holds cls (N, D), patch (N, P, D), reg (N, R, D) for register models, index (N,)
(row of the input each line comes from) and, for a folder, paths (N,) relative to it.
"""
import argparse
import os
import sys

import numpy as np

from dinov2_jax import convert
from dinov2_jax.data import sources
from dinov2_jax.eval import extract


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    extract.add_model_arguments(parser, batch_size=64)
    parser.add_argument("--input", required=True, help="image folder or .npy (N, H, W, 3)")
    parser.add_argument("--output", required=True, help="output .npz file")
    return parser.parse_args(argv)


def load_array(path, patch_size):
    """The (N, H, W, 3) float32 array of a .npy file, memory-mapped, checked."""
    images = np.load(path, mmap_mode="r")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.float32:
        raise ValueError(f"{path}: expected a float32 array (N, H, W, 3) of normalised images, "
                         f"got {images.dtype} {images.shape}")
    if images.shape[1] % patch_size or images.shape[2] % patch_size:
        raise ValueError(f"{path}: image size {images.shape[1]}x{images.shape[2]} is not a "
                         f"multiple of the patch size {patch_size}")
    if not len(images):
        raise ValueError(f"{path} holds no images")
    return images


def features_of_input(model, params, path, *, size=224, batch_size=64, dtype=None,
                      num_workers=0, progress=True):
    """The arrays the CLI writes, for an image folder or a .npy file at `path`."""
    names = ("cls", "patch", "reg") if model.num_register_tokens else ("cls", "patch")
    if os.path.isdir(path):
        if size % model.patch_size:
            raise ValueError(f"--size {size} is not a multiple of the patch size "
                             f"{model.patch_size}")
        source = sources.FolderSource(path)
        out = extract.extract_source(model, params, source, features=names, image_size=size,
                                     batch_size=batch_size, dtype=dtype,
                                     num_workers=num_workers, progress=progress, desc="images")
        paths = np.asarray([os.path.relpath(source.paths[i], path) for i in out["index"]])
        skipped = len(source) - len(out["index"])
        if skipped:
            print(f"skipped {skipped} unreadable images of {len(source)}", file=sys.stderr)
        return {**{name: out[name] for name in names}, "index": out["index"], "paths": paths}
    if path.endswith(".npy") and os.path.isfile(path):
        images = load_array(path, model.patch_size)
        out = extract.extract(model, params, extract.array_batches(images, batch_size),
                              features=names, dtype=dtype, num_images=len(images),
                              progress=progress, desc="images")
        return {**{name: out[name] for name in names}, "index": out["index"]}
    raise ValueError(f"--input {path} is neither an image folder nor a .npy file")


def main(argv=None):
    args = _parse(argv)
    if not os.path.exists(args.weights):
        raise SystemExit(f"--weights {args.weights} does not exist")
    model, params = convert.load_weights(args.weights, args.arch, args.network)
    try:
        arrays = features_of_input(model, params, args.input, size=args.size,
                                   batch_size=args.batch_size, dtype=args.dtype,
                                   num_workers=args.num_workers)
    except ValueError as e:
        raise SystemExit(str(e)) from e
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as f:
        np.savez(f, **arrays)
    shapes = ", ".join(f"{name} {value.shape}" for name, value in arrays.items())
    print(f"wrote {args.output}: {shapes}", file=sys.stderr)


if __name__ == "__main__":
    main()
