"""Per-device memory of a training recipe on a device mesh, on paper: no device is touched.

The train state (student, teacher, AdamW moments) and the gradients are counted from their
actual shapes (`jax.eval_shape` of the state's init) sharded by the run's own rules
(`dinov2_jax.parallel.state_shardings`) on an abstract mesh of the machine's size, exactly as
`python -m dinov2_jax.main` reports it at start-up. Gathered weights and activations are
estimated with the formula of docs/scaling.md from the model's dimensions.

With `--teacher_config`, the run is a distillation (dinov2_jax/train/distill.py): the frozen
teacher's params (no gradient, no optimizer state) join the state rows, the student keeps a
spare EMA instead of a teacher, the gathered weights add one teacher block and head, and iBOT
covers every global-crop patch (no masks), in the student's and the teacher's logits.

  python benchmarks/memory.py                        # ViT-g/14, vitg14 recipe, batch 3072
  python benchmarks/memory.py --config=configs/vitl14.py --batch_size=2048
  python benchmarks/memory.py --config=configs/dinov3_vit7b16.py:gram   # ViT-7B/16, Gram stage

With DINOv3's Gram anchoring the Gram teacher (a third backbone) is a state row, and its
forward on the Gram crops and the Gram matrices are activation rows.
  python benchmarks/memory.py --config=configs/vitl14_distilled.py --teacher_config=configs/vitg14.py
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import AbstractMesh, AxisType

from dinov2_jax import cli, configs, parallel
from dinov2_jax.data import masking
from dinov2_jax.models import vit
from dinov2_jax.train import distill
from dinov2_jax.train import setup as setup_lib
from dinov2_jax.train import teacher as teacher_lib

GB = 1e9


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    devices: int
    hbm_bytes: float
    devices_per_host: int


# v5p-256 counts TensorCores: 128 chips, one JAX device (megacore) of 95 GB HBM2e each.
MACHINES = (Machine("256 x H100 (32 nodes x 8)", 256, 80 * GB, 8),
            Machine("v5p-256 (128 chips)", 128, 95 * GB, 4))


def abstract_setup(config, data=1, fsdp=1, teacher_config=None):
    """The run's Setup on an abstract data x fsdp mesh: shapes and shardings, nothing allocated;
    with `teacher_config`, the distillation Setup of a frozen teacher made with it."""
    mesh = AbstractMesh((data, fsdp), parallel.BATCH_AXES, axis_types=(AxisType.Auto,) * 2)
    if teacher_config is not None:
        return distill.build(config, mesh, teacher_lib.paper_teacher(teacher_config, config))
    return setup_lib.build(config, mesh)


def state_bytes(config, data, fsdp, teacher_config=None):
    """Per-device bytes of the state's networks (student, teacher, opt_state; a distillation
    adds student_ema, its teacher frozen) and the gradients on a data x fsdp mesh."""
    setup = abstract_setup(config, data, fsdp, teacher_config)
    out = {name: parallel.bytes_per_device(tree)
           for name, tree in setup.memory_trees(setup.abstract_state).items()}
    out["gradients"] = out["student"]  # same shapes, dtypes and rules as the student params
    return out


def _nbytes(tree):
    return sum(math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
               for leaf in jax.tree.leaves(tree))


def gathered_weight_bytes(student, gradient=True):
    """FSDP all-gathers at most one scanned block of a network plus its largest head at a
    time; its weight gradient (`gradient`: not for a frozen teacher) is as large before the
    reduce-scatter."""
    backbone = student["backbone"]
    depth = jax.tree.leaves(backbone["blocks"])[0].shape[0]
    block = _nbytes(backbone["blocks"]) // depth
    head = max(_nbytes(student[name]) for name in student if name.endswith("_head"))
    return (2 if gradient else 1) * (block + head)


def tokens(image_size, patch_size, registers):
    return 1 + registers + (image_size // patch_size) ** 2


def activation_bytes(config, networks, images, teacher_networks=None):
    """The docs/scaling.md estimate of activation memory for `images` images on one device.

    Student backbone (compute dtype, a bytes): the scan keeps each block's input,
    L*T*D per image, with a remat policy (which saves no activation with a batch dimension);
    without one, every block's intermediates, L*T*(10D + 3H). Backward of one block recomputes
    and differentiates its intermediates: 2*T*(10D + 3H). Attention is a flash kernel (cudnn or
    splash: no T^2 probabilities). Heads and losses (fp32): logits, log-softmax and their
    gradient of the student's rows, and the teacher's probabilities, K prototypes each. A
    frozen teacher (`teacher_networks`) keeps no activations: one block's forward
    intermediates on the global crops at a time.
    """
    model, crops = networks.backbone, config.crops
    a = jnp.dtype(config.student.dtype).itemsize
    d, depth, registers = model.embed_dim, model.depth, model.num_register_tokens
    hidden = vit.ffn_hidden_dim(d, model.mlp_ratio, model.ffn_layer)
    global_tokens = tokens(crops.global_crops_size, model.patch_size, registers)
    per_image = (2 * global_tokens
                 + crops.local_crops_number * tokens(crops.local_crops_size, model.patch_size,
                                                     registers))
    block_intermediates = per_image * (10 * d + 3 * hidden)
    kept = per_image * d if config.student.remat_policy != "none" else block_intermediates
    patches = (crops.global_crops_size // model.patch_size) ** 2
    masked_rows = (2 * images * patches if teacher_networks is not None else
                   masking.mask_upperbound(2 * images, patches, config.ibot.mask_ratio_min_max,
                                           config.ibot.mask_sample_probability))
    student_rows = (2 + crops.local_crops_number) * images + masked_rows
    teacher_rows = 2 * images + masked_rows
    prototypes = max(config.dino.head_n_prototypes, networks.patch_head().out_dim)
    rows = {}
    if teacher_networks is not None:
        teacher = teacher_networks.backbone
        teacher_hidden = vit.ffn_hidden_dim(teacher.embed_dim, teacher.mlp_ratio,
                                            teacher.ffn_layer)
        teacher_tokens = 2 * tokens(crops.global_crops_size, teacher.patch_size,
                                    teacher.num_register_tokens)
        rows["teacher forward (transient)"] = (images * teacher_tokens
                                               * (10 * teacher.embed_dim + 3 * teacher_hidden) * a)
    rows = {
        **rows,
        "saved activations": images * depth * kept * a,
        "one block's backward": images * 2 * block_intermediates * a,
        "head logits": (3 * student_rows + teacher_rows) * prototypes * 4,
        "input crops": images * 4 * 3 * (2 * crops.global_crops_size ** 2
                                         + crops.local_crops_number * crops.local_crops_size ** 2),
    }
    if config.gram.use_loss:
        rows.update(gram_activation_bytes(config, networks, images))
    return rows


def gram_activation_bytes(config, networks, images):
    """DINOv3's Gram loss: the Gram teacher's forward (no gradient: one block's intermediates
    at a time, 2 * T_gram * (10D + 3H) per image, plus its fp32 patch tokens), its crops, and
    the fp32 similarity matrices of student and teacher and their difference's gradient:
    3 * 2b * P^2 per image (img_level) or 3 * (2b * P)^2 over the device's batch."""
    model, crops, a = networks.backbone, config.crops, jnp.dtype(config.student.dtype).itemsize
    d = model.embed_dim
    hidden = vit.ffn_hidden_dim(d, model.mlp_ratio, model.ffn_layer)
    size = crops.gram_teacher_crops_size or crops.global_crops_size
    gram_tokens = tokens(size, model.patch_size, model.num_register_tokens)
    patches = (crops.global_crops_size // model.patch_size) ** 2
    rows = {}
    if not config.gram.ema_teacher:
        rows["Gram teacher forward"] = (images * 2 * gram_tokens * (10 * d + 3 * hidden) * a
                                        + images * 2 * (size // model.patch_size) ** 2 * d * 4)
    if crops.gram_teacher_crops_size:
        rows["Gram crops"] = images * 4 * 3 * 2 * size ** 2
    matrices = 2 * images * patches ** 2 if config.gram.img_level else (2 * images * patches) ** 2
    rows["Gram matrices"] = 3 * matrices * 4
    return rows


def estimate(config, networks, state, machine, data, fsdp, teacher=None):
    """Rows of (what, bytes per device) for one machine and mesh; `teacher` (a paper Teacher)
    makes it a distillation run."""
    images = config.train.batch_size // machine.devices
    rows = state_bytes(config, data, fsdp, teacher and teacher.config)
    if fsdp > 1:
        rows["gathered weights (transient)"] = gathered_weight_bytes(state["student"]) + (
            gathered_weight_bytes(teacher.abstract_params, gradient=False) if teacher else 0)
    rows.update(activation_bytes(config, networks, images, teacher and teacher.networks))
    return images, rows


def meshes(machine):
    """Full FSDP (the recipe's), FSDP inside a host with data parallelism across hosts, and
    plain data parallelism (a full replica on every device) for comparison."""
    n, host = machine.devices, machine.devices_per_host
    return ((1, n), (n // host, host), (n, 1))


def print_tables(config, networks, state, machines, teacher=None):
    params = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(state["student"]))
    total = sum(state_bytes(config, 1, 1, teacher and teacher.config).values())
    if teacher is not None:
        teacher_params = sum(math.prod(leaf.shape)
                             for leaf in jax.tree.leaves(teacher.abstract_params))
        print(f"distillation: frozen teacher {teacher.config.student.arch}/"
              f"{teacher.config.student.patch_size}, {teacher_params / 1e9:.3f}B params (no "
              "gradient, no AdamW); iBOT on every global-crop patch")
    parts = "student + frozen teacher + EMA student" if teacher else "student + teacher"
    if "gram_teacher" in state:
        parts += " + Gram teacher"
    print(f"{config.student.arch}/{config.student.patch_size}: {params / 1e9:.3f}B student "
          f"params; {parts} + AdamW + gradients = {total / GB:.1f} GB unsharded; "
          f"global batch {config.train.batch_size}; activations in {config.student.dtype}, "
          f"remat {config.student.remat_policy}")
    for machine in machines:
        if config.train.batch_size % machine.devices:
            raise ValueError(f"global batch {config.train.batch_size} does not split over "
                             f"{machine.devices} devices")
        results = [(f"data={data} fsdp={fsdp}", *estimate(config, networks, state, machine,
                                                          data, fsdp, teacher))
                   for data, fsdp in meshes(machine)]
        images = results[0][1]
        names = list(dict.fromkeys(name for _, _, rows in results for name in rows))
        print(f"\n{machine.name}: {images} images per device, {machine.hbm_bytes / GB:.0f} GB "
              f"HBM per device. GB per device:")
        header = f"| {'':30} | " + " | ".join(f"{mesh:>18}" for mesh, _, _ in results) + " |"
        print(header)
        print("|" + "-" * 32 + "|" + "|".join("-" * 20 for _ in results) + "|")
        for name in names + ["total"]:
            values = [sum(rows.values()) if name == "total" else rows.get(name, 0)
                      for _, _, rows in results]
            print(f"| {name:30} | " + " | ".join(f"{v / GB:18.4f}" for v in values) + " |")
        print(f"| {'share of HBM':30} | " + " | ".join(
            f"{sum(rows.values()) / machine.hbm_bytes:18.1%}" for _, _, rows in results) + " |")


def _define(flag_values):
    flags.DEFINE_string("config", "configs/vitg14.py", "recipe file[:arg], as for "
                        "dinov2_jax.main", flag_values=flag_values)
    flags.DEFINE_integer("batch_size", 0, "global batch; 0 keeps the recipe's",
                         flag_values=flag_values)
    flags.DEFINE_string("teacher_config", "", "a distillation: the frozen teacher's recipe "
                        "file[:arg] (e.g. configs/vitg14.py); --config is the student's",
                        flag_values=flag_values)


def main(argv):
    args = cli.parse(argv, _define, __doc__)
    config = configs.load(args.config)
    if args.batch_size:
        config.train.batch_size = args.batch_size
    teacher = None
    if args.teacher_config:
        teacher = teacher_lib.paper_teacher(configs.load(args.teacher_config), config)
        setup = abstract_setup(config, teacher_config=teacher.config)
        networks = setup.students[""].networks
    else:
        setup = abstract_setup(config)
        networks = setup.networks
    print_tables(config, networks, setup.abstract_state, MACHINES, teacher)


if __name__ == "__main__":
    cli.run(main)
