"""A long side-by-side: our train step and the reference's `SSLMetaArch`, each on its own.

`tests/test_step.py` holds the two sides equal for two steps; this runs both on their own for
120 steps (400 were run once, see below) from the same weights, on the same demo batches and
iBOT masks (our Grain pipeline's, handed to the reference in its `collate_data_and_cast`
layout), with drop path off (the reference's harness runs global and local crops as separate
tensor forwards, equal to its nested-tensor list only without drop path). Each side is left to
its own trajectory: the curves compared are those of the teacher's DINO and iBOT targets,
per-image entropy and the entropy of the batch-mean distribution, as fractions of log K (our
step's `dino/entropy`, ... metrics; the reference's probabilities recorded from its own
teacher normalisation). A fault that only shows over many steps (an EMA, a schedule, a center,
an optimizer moment drifting) bends our curve away from the reference's; the recipe's own
dynamics show in both. The recipe compared is the demo as issue 15 found it, whose DINO head
collapses to uniform targets: the reference collapses the same way, step for step.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("dinov2.loss")

import jax  # noqa: E402

from dinov2_jax import configs  # noqa: E402
from dinov2_jax.data import pipeline  # noqa: E402
from dinov2_jax.train import optim, schedules as schedules_lib  # noqa: E402
from dinov2_jax.train import state as state_lib, step as step_lib  # noqa: E402

from test_step import ReferenceTrainer, reference_arch  # noqa: E402,F401 (fixture)
from torch_process_group import single_process_group  # noqa: E402,F401 (autouse fixture)

CURVES = ("dino/entropy", "dino/batch_entropy", "ibot/entropy", "ibot/batch_entropy")


def entropies(probs, valid=None):
    """(mean per-row entropy, entropy of the mean row) of probabilities (R, K), / log K."""
    probs = np.asarray(probs, np.float64)
    if valid is not None:
        probs = probs[np.asarray(valid, bool)]
    log_k = np.log(probs.shape[-1])
    rows = -np.sum(probs * np.log(np.maximum(probs, 1e-30)), axis=-1)
    mean = probs.mean(axis=0)
    return rows.mean() / log_k, -np.sum(mean * np.log(np.maximum(mean, 1e-30))) / log_k


def reference_batch(batch):
    """Our batch (one mask group) in the layout of the reference's collate_data_and_cast."""
    def nchw(x):
        return torch.from_numpy(np.ascontiguousarray(
            np.asarray(x).reshape(-1, *x.shape[2:]).transpose(0, 3, 1, 2)))
    assert batch["mask_indices"].shape[0] == 1, "one mask group: the reference's one rank"
    masks = torch.from_numpy(np.asarray(batch["masks"]).reshape(-1, batch["masks"].shape[-1]))
    indices = masks.flatten().nonzero().flatten()
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return {"collated_global_crops": nchw(batch["global_crops"]),
            "collated_local_crops": nchw(batch["local_crops"]),
            "collated_masks": masks, "mask_indices_list": indices, "masks_weight": weight,
            "upperbound": batch["mask_indices"].shape[1],
            "n_masked_patches": torch.full((1,), len(indices), dtype=torch.long)}


class _RecordedTargets:
    """Wraps the reference's teacher normalisations (centering and Sinkhorn-Knopp, DINO and
    iBOT) on one SSLMetaArch and keeps the last step's teacher probabilities."""

    def __init__(self, model):
        self.last = {}
        for name, loss in (("dino", model.dino_loss), ("ibot", model.ibot_patch_loss)):
            for method in ("softmax_center_teacher", "sinkhorn_knopp_teacher"):
                setattr(loss, method, self._wrap(name, getattr(loss, method)))

    def _wrap(self, name, function):
        def recorded(*args, **kwargs):
            out = function(*args, **kwargs)
            self.last[name] = out.detach().reshape(-1, out.shape[-1]).numpy()
            return out
        return recorded


def side_by_side(arch_module, config, steps, monkeypatch):
    """{curve: (ours (steps,), reference's (steps,))} and the per-step DINO losses of both."""
    networks = state_lib.build_networks(config)
    schedules = schedules_lib.make_schedules(config)
    student = state_lib.init_student(networks, config, jax.random.PRNGKey(config.train.seed))
    optimizer = optim.make_optimizer(config, student, schedules)
    state = state_lib.create_train_state(networks, config, optimizer, None, student)
    reference = ReferenceTrainer(arch_module, config, networks, student)
    reference._record_gradients = lambda: None  # the 2-step test's bookkeeping, not needed here
    recorded = _RecordedTargets(reference.model)
    train_step = jax.jit(step_lib.make_train_step(networks, config, optimizer, schedules))
    data = pipeline.make_train_iterator(config, process_index=0, process_count=1,
                                        mask_groups=1)
    curves = {key: ([], []) for key in CURVES}
    losses = ([], [])
    for iteration in range(steps):
        batch = {k: v for k, v in next(data).items() if k != pipeline.BAD_KEY}
        state, metrics = train_step(state, batch)
        ref_losses = reference.step(reference_batch(batch), iteration, monkeypatch)
        n_masked = int(np.sum(batch["masks_weight"] > 0))
        theirs = (*entropies(recorded.last["dino"]),
                  *entropies(recorded.last["ibot"][:n_masked]))
        for key, value in zip(CURVES, theirs):
            curves[key][0].append(float(metrics[key]))
            curves[key][1].append(value)
        losses[0].append(float(metrics["dino_local_crops_loss"])
                         + float(metrics["dino_global_crops_loss"]))
        losses[1].append(ref_losses["dino_local_crops_loss"] + ref_losses["dino_global_crops_loss"])
    return ({key: (np.asarray(a), np.asarray(b)) for key, (a, b) in curves.items()},
            tuple(np.asarray(x) for x in losses))


def collapsing_demo_config():
    """configs/demo.py as issue 15 found it: the prototypes learn from step epoch_length on (the
    reference's freeze_last_layer_epochs=1), and the DINO head collapses to uniform targets.
    Drop path off, the step's XLA attention, no evaluation, 32 images a step."""
    config = configs.load("configs/demo.py")
    config.optim.freeze_last_layer_epochs = 1
    config.student.update(drop_path_rate=0.0, attention="xla")
    config.train.update(batch_size=32, num_workers=0)
    config.evaluation.update(knn_train="", knn_val="", at_start=False)
    return config


# The two sides start from equal weights, batches and masks, so their first steps agree to
# fp32 rounding (the 2-step test's 1e-6 on losses; entropies are sums over K of such terms).
EARLY_STEPS, EARLY_TOL = 5, 1e-4
# Then each side rounds its own way and the trajectories part like two runs of one recipe on
# two machines. Curves are compared as 20-step moving averages. Measured over 400 steps of the
# collapsing demo recipe at batch 64 (issue 15): max |ours - reference| 0.004 per step on
# every curve; at batch 32 over 200 steps 0.001. 0.02 leaves room for the divergence of other
# draws and is far below what a fault moves (the collapse takes dino/entropy from 0.47 to 0.78
# log K in 120 steps at batch 32, and to 0.997 in 400 at batch 64).
WINDOW, CURVE_TOL = 20, 0.02
PARITY_STEPS = 120


def moving_average(x, window=WINDOW):
    return np.convolve(x, np.ones(window) / window, mode="valid")


@pytest.mark.slow
def test_teacher_entropy_curves_follow_the_reference_into_the_collapse(reference_arch,
                                                                      monkeypatch):
    config = collapsing_demo_config()
    config.train.seed = np.random.randint(2**16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # JAX already keeps the cores busy; torch's own pool only spins
    try:
        curves, (loss, ref_loss) = side_by_side(reference_arch, config, PARITY_STEPS,
                                                monkeypatch)
    finally:
        torch.set_num_threads(threads)
    for step in range(0, PARITY_STEPS, 20):
        print(step, " ".join(f"{key} {curves[key][0][step]:.3f}/{curves[key][1][step]:.3f}"
                             for key in CURVES), f"dino loss {loss[step]:.3f}/{ref_loss[step]:.3f}")
    for key, (ours, theirs) in curves.items():
        np.testing.assert_allclose(ours[:EARLY_STEPS], theirs[:EARLY_STEPS], atol=EARLY_TOL,
                                   err_msg=key)
        gap = np.abs(moving_average(ours) - moving_average(theirs)).max()
        assert gap <= CURVE_TOL, f"{key}: 20-step averages differ by up to {gap:.3f}"
    # The compared curve moves: agreement of two flat lines would show little.
    dino = moving_average(curves["dino/entropy"][1])
    assert np.abs(dino - dino[0]).max() > 5 * CURVE_TOL
    loss_gap = np.abs(moving_average(loss) - moving_average(ref_loss)).max()
    assert loss_gap <= CURVE_TOL * np.log(config.dino.head_n_prototypes), loss_gap
