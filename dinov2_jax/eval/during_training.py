"""The evaluations a training run makes of its teacher, built from `config.evaluation`.

`make_evaluator(config)` returns the callback that `train.loop.train` calls with the backbone
module and the teacher's backbone params, or None when nothing is configured:
- k-NN on `evaluation.knn_train` / `knn_val` at the training crop size, resized like the
  eval CLIs;
- the linear segmentation probe on `evaluation.segmentation_train` / `segmentation_val` and
  the linear depth probe on `evaluation.depth_train` / `depth_val` (each pair set together),
  with `evaluation.dense_*` head settings (heads train on cached window features).
Results are one flat dict (`knn/top1`, `segmentation/mIoU`, `depth/rmse`, ...).
"""
from dinov2_jax.errors import ConfigError
from dinov2_jax.eval import depth, extract, knn, segmentation


def make_evaluator(config):
    evaluation = config.evaluation
    dense = {"segmentation": (evaluation.segmentation_train, evaluation.segmentation_val),
             "depth": (evaluation.depth_train, evaluation.depth_val)}
    for name, (train, val) in dense.items():
        if bool(train) != bool(val):
            raise ConfigError(f"config error at evaluation.{name}_train: evaluation.{name}_train "
                              f"and evaluation.{name}_val must be set together (got {train!r} "
                              f"and {val!r})")
    if not evaluation.knn_train and not any(train for train, _ in dense.values()):
        return None
    size = config.crops.global_crops_size
    head = dict(image_size=evaluation.dense_size or size, batch_size=evaluation.batch_size,
                steps=evaluation.dense_steps, head_batch_size=evaluation.dense_head_batch_size,
                lr=evaluation.dense_lr,
                warmup_steps=min(evaluation.dense_warmup_steps, evaluation.dense_steps))
    probes = {"segmentation": segmentation.evaluate, "depth": depth.evaluate}

    def evaluate(model, params):
        results = {}
        if evaluation.knn_train:
            results.update(knn.knn_eval(
                model, params, evaluation.knn_train, evaluation.knn_val, image_size=size,
                resize_size=extract.default_resize_size(size, evaluation.knn_resize),
                batch_size=evaluation.batch_size))
        for name, (train, val) in dense.items():
            if train:
                results.update(probes[name](model, params, train, val, **head)[0])
        return results

    return evaluate
