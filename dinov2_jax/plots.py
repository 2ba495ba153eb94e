"""Figures for people who would rather look than read (matplotlib, imported lazily).

  read_metrics / plot_metrics   training curves from a workdir's metrics.jsonl against
                                "step": losses on one panel, eval summaries such as
                                knn/top1 on another
  pca_rgb / plot_pca_maps       patch features -> first three PCA components as RGB, the
                                DINOv2 paper's figure: a first PCA separates foreground from
                                background, a second PCA on the foreground patches colours it
  plot_neighbors                a grid of query images and their nearest neighbours
  plot_dense_predictions        image, ground truth and prediction per row, for the
                                segmentation and depth probes

Images are the normalised NHWC float32 arrays the models take; `to_display` undoes the
ImageNet normalisation. Every plot function returns its matplotlib Figure.
"""
import json

import numpy as np

from dinov2_jax.data import augment

SUMMARY_METRICS = ("top1", "top5", "mAP")


def to_display(images):
    """Normalised images (..., H, W, 3) -> RGB in [0, 1] for imshow."""
    mean = np.asarray(augment.IMAGENET_MEAN, np.float32)
    std = np.asarray(augment.IMAGENET_STD, np.float32)
    return np.clip(np.asarray(images, np.float32) * std + mean, 0.0, 1.0)


def read_metrics(path):
    """The records of a metrics.jsonl file (one JSON object per line), in file order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _series(records, key):
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and "step" in r]
    return np.asarray(points, np.float64).reshape(-1, 2)


def plot_metrics(records, keys=None, *, figsize=(11, 4)):
    """Curves of `keys` (default: every numeric key with "loss" in its name, plus the eval
    summaries such as knn/top1 and linear/top1) against step. `records` is a list of dicts
    or a path to metrics.jsonl."""
    import matplotlib.pyplot as plt
    if isinstance(records, str):
        records = read_metrics(records)
    numeric = sorted({k for r in records for k, v in r.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"})
    if keys is None:
        keys = [k for k in numeric if "loss" in k or k.split("/")[-1] in SUMMARY_METRICS]
    losses = [k for k in keys if "loss" in k]
    others = [k for k in keys if k not in losses]
    if not keys:
        raise ValueError(f"nothing to plot: no loss or accuracy keys among {numeric}")
    panels = [p for p in (losses, others) if p]
    figure, axes = plt.subplots(1, len(panels), figsize=figsize, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for key in panel:
            series = _series(records, key)
            ax.plot(series[:, 0], series[:, 1], marker="o" if len(series) < 20 else None,
                    label=key)
        ax.set_xlabel("step")
        ax.set_title("losses" if panel is losses else "evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    figure.tight_layout()
    return figure


def _pca(x, components):
    centered = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centered, full_matrices=False)
    return centered @ vt[:components].T


def _unit_range(x):
    low, high = x.min(axis=0), x.max(axis=0)
    return (x - low) / np.where(high > low, high - low, 1.0)


def pca_rgb(patch_features, grid_shape, *, foreground_threshold=0.5):
    """(B, P, D) patch features of B images on an (h, w) grid -> (B, h, w, 3) RGB in [0, 1].

    A first PCA over all patches of all images; its first component, scaled to [0, 1] and
    signed so that border patches score lower than central ones on average, is the
    foreground score. Patches above `foreground_threshold` get the first three components of
    a second PCA over the foreground patches, scaled to [0, 1] per component; background is
    black. `foreground_threshold=None` skips the split and colours every patch.
    """
    features = np.asarray(patch_features, np.float64)
    batch, patches, dim = features.shape
    height, width = grid_shape
    if height * width != patches:
        raise ValueError(f"grid {grid_shape} does not hold {patches} patches")
    flat = features.reshape(-1, dim)
    foreground = np.ones(len(flat), bool)
    if foreground_threshold is not None:
        first = _pca(flat, 1)[:, 0].reshape(batch, height, width)
        border = np.ones((height, width), bool)
        border[1:-1, 1:-1] = False
        if height > 2 and width > 2 and first[:, border].mean() > first[:, ~border].mean():
            first = -first
        score = _unit_range(first.reshape(-1, 1))[:, 0]
        foreground = score > foreground_threshold
        if foreground.sum() < 3:
            foreground = np.ones(len(flat), bool)
    rgb = np.zeros((len(flat), 3))
    components = _pca(flat[foreground], min(3, dim))
    rgb[foreground, :components.shape[1]] = _unit_range(components)
    return rgb.reshape(batch, height, width, 3)


def plot_pca_maps(images, patch_features, grid_shape, *, foreground_threshold=0.5,
                  figsize_per_image=2.2):
    """Each image above its PCA map (see `pca_rgb`)."""
    import matplotlib.pyplot as plt
    maps = pca_rgb(patch_features, grid_shape, foreground_threshold=foreground_threshold)
    count = len(maps)
    figure, axes = plt.subplots(2, count, squeeze=False,
                                figsize=(figsize_per_image * count, 2 * figsize_per_image))
    for i in range(count):
        axes[0, i].imshow(to_display(images[i]))
        axes[1, i].imshow(maps[i], interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    axes[0, 0].set_title("image", loc="left", fontsize="small")
    axes[1, 0].set_title("patch PCA", loc="left", fontsize="small")
    figure.tight_layout()
    return figure


def plot_neighbors(query_images, neighbor_images, *, similarities=None, query_labels=None,
                   neighbor_labels=None, figsize_per_image=1.6):
    """Row i: query i, then its neighbours (Q, K, H, W, 3), titled with similarity/label."""
    import matplotlib.pyplot as plt
    queries, k = np.shape(neighbor_images)[:2]
    figure, axes = plt.subplots(queries, k + 1, squeeze=False,
                                figsize=(figsize_per_image * (k + 1), figsize_per_image * queries))
    for q in range(queries):
        axes[q, 0].imshow(to_display(query_images[q]))
        axes[q, 0].set_title("query" if query_labels is None else f"query ({query_labels[q]})",
                             fontsize="small")
        for j in range(k):
            ax = axes[q, j + 1]
            ax.imshow(to_display(neighbor_images[q][j]))
            parts = []
            if similarities is not None:
                parts.append(f"{similarities[q][j]:.2f}")
            if neighbor_labels is not None:
                parts.append(f"({neighbor_labels[q][j]})")
            ax.set_title(" ".join(parts), fontsize="small")
        for ax in axes[q]:
            ax.axis("off")
    figure.tight_layout()
    return figure


def plot_dense_predictions(images, targets, predictions, *, kind="segmentation",
                           num_classes=None, ignore_index=255, figsize_per_image=2.2):
    """Row i: image i (uint8 RGB, or normalised float), its ground truth and the prediction.

    Segmentation: classes in a qualitative colour map over `num_classes` (default: the
    largest class shown + 1), ignored pixels black. Depth: metres in one colour scale per
    row (near bright), pixels without depth (0) black."""
    import matplotlib.pyplot as plt
    if kind not in ("segmentation", "depth"):
        raise ValueError(f"kind must be 'segmentation' or 'depth', got {kind!r}")
    count = len(images)
    figure, axes = plt.subplots(count, 3, squeeze=False,
                                figsize=(3 * figsize_per_image, count * figsize_per_image))
    if kind == "segmentation" and num_classes is None:
        num_classes = 1 + max(int(np.max(np.where(np.asarray(t) == ignore_index, 0, t)))
                              for t in (*targets, *predictions))
    for i in range(count):
        image = np.asarray(images[i])
        axes[i, 0].imshow(image if image.dtype == np.uint8 else to_display(image))
        target, prediction = np.asarray(targets[i]), np.asarray(predictions[i])
        if kind == "segmentation":
            cmap = plt.get_cmap("tab20", max(num_classes, 2)).with_extremes(bad="black")
            for ax, labels in ((axes[i, 1], target), (axes[i, 2], prediction)):
                ax.imshow(np.ma.masked_equal(labels, ignore_index), cmap=cmap, vmin=0,
                          vmax=max(num_classes, 2) - 1, interpolation="nearest")
        else:
            known = target[target > 0]
            low, high = (known.min(), known.max()) if known.size else (0.0, 1.0)
            cmap = plt.get_cmap("magma_r").with_extremes(bad="black")
            for ax, depth in ((axes[i, 1], np.ma.masked_less_equal(target, 0)),
                              (axes[i, 2], prediction)):
                ax.imshow(depth, cmap=cmap, vmin=low, vmax=high)
        for ax in axes[i]:
            ax.axis("off")
    for ax, title in zip(axes[0], ("image", "ground truth", "prediction")):
        ax.set_title(title, loc="left", fontsize="small")
    figure.tight_layout()
    return figure


def grid_shape(image_shape, patch_size):
    """(h, w) patch grid of an (H, W) image."""
    return image_shape[0] // patch_size, image_shape[1] // patch_size

