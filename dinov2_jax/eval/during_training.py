"""The evaluations a training run makes of its teacher, built from `config.evaluation`.

`make_evaluator(config)` returns the callback that `train.loop.train` calls with the backbone
module and the teacher's backbone params (or None when nothing is configured): k-NN on
`evaluation.knn_train` / `knn_val` at the training crop size, resized like the eval CLIs.
"""
from dinov2_jax.eval import extract, knn


def make_evaluator(config):
    evaluation = config.evaluation
    if not evaluation.knn_train:
        return None
    size = config.crops.global_crops_size

    def evaluate(model, params):
        return knn.knn_eval(model, params, evaluation.knn_train, evaluation.knn_val,
                            image_size=size,
                            resize_size=extract.default_resize_size(size, evaluation.knn_resize),
                            batch_size=evaluation.batch_size)

    return evaluate
