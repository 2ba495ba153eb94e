#!/usr/bin/env bash
# Puts what the GPU run needs beside the checkout into .devref/ (git-ignored; the device tool
# must carry it): the reference timing harness, and wheels for what the GPU image lacks
# (wheels.txt): the official DINOv2 code (its `dinov2` folder at the pinned commit, in
# .devref/dinov2_src: its setup.py packages no train recipes), pure-Python wheels (built here
# from sdists where PyPI has none), and CPython 3.12 manylinux x86_64 wheels for the compiled
# ones. The pure ones are also installed into .devref/cpu_site, for this machine's CPU smoke
# run of the reference stage.
#
#   benchmarks/gpu/prepare.sh HARNESS_DIR DINOV2_REPO
#
# HARNESS_DIR holds train_step.py, features.py and shim/xformers; DINOV2_REPO is a clone (or
# bare git directory) of github.com/facebookresearch/dinov2 that has the pinned commit.
set -euo pipefail
harness=${1:?usage: prepare.sh HARNESS_DIR DINOV2_REPO}
dinov2_repo=${2:?usage: prepare.sh HARNESS_DIR DINOV2_REPO}
harness=$(cd "$harness" && pwd)
dinov2_repo=$(cd "$dinov2_repo" && pwd)
cd "$(dirname "$0")/../.."
list=benchmarks/gpu/wheels.txt
for name in train_step.py features.py shim/xformers; do
  [ -e "$harness/$name" ] || { echo "error: $harness has no $name" >&2; exit 1; }
done
gitdir=$dinov2_repo/.git
[ -e "$gitdir" ] || gitdir=$dinov2_repo
commit=$(awk '$1 == "source" && $2 == "dinov2" {print $4}' $list)
git --git-dir="$gitdir" cat-file -e "$commit^{commit}" 2>/dev/null || {
  echo "error: $dinov2_repo has no commit $commit (fetch github.com/facebookresearch/dinov2)" >&2
  exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.devref/' "$exclude" 2>/dev/null || echo '/.devref/' >> "$exclude"

dest=.devref
rm -rf "$dest"
mkdir -p "$dest/wheels" "$dest/dinov2_src" "$dest/build/sdist" "$dest/build/cpu"
cp -r "$harness" "$dest/torch_ref"
chmod -R u+w "$dest/torch_ref"
find "$dest/torch_ref" -name __pycache__ -prune -exec rm -rf {} +

git --git-dir="$gitdir" archive "$commit" dinov2 LICENSE | tar -x -C "$dest/dinov2_src"

pip_download="python -m pip download -q --disable-pip-version-check --no-deps"
pure=$(awk '$1 == "pure" {print $2}' $list)
$pip_download -d "$dest/build/sdist" $pure
$pip_download --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$dest/wheels" $(awk '$1 == "binary" {print $2}' $list)
for sdist in "$dest"/build/sdist/*.tar.gz; do
  [ -e "$sdist" ] || continue
  python -m pip wheel -q --no-deps --no-build-isolation -w "$dest/build/sdist" "$sdist"
done
$pip_download -d "$dest/build/cpu" $(awk '$1 == "cpu" {print $2}' $list)
python -m pip install -q --disable-pip-version-check --no-deps --no-compile \
  --target "$dest/cpu_site" "$dest"/build/sdist/*.whl \
  "$dest"/build/cpu/*.whl
mv "$dest"/build/sdist/*.whl "$dest/wheels/"
rm -rf "$dest/build"
ls "$dest/wheels"
du -sh "$dest"
