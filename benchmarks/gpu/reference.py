"""Runs the reference's timing harness (official PyTorch DINOv2) and writes its rows as JSON.

The harness is a folder with `train_step.py`, `features.py` and `shim/xformers` (the
reference's own train step and hub backbones, timed on one GPU; `prepare.sh` beside this file
copies it into `.devref/torch_ref`). On a GPU this calls the harness's own `run(name)` and
`bench(arch, size, batch)` after the same set-up as its command line (TF32 matmuls, its
patches for current PyTorch, a one-process distributed group), and turns each printed line
into a row shaped like dinov2_jax's: benchmark, impl, device, torch, config, batch, img/s,
peak memory. This process imports no JAX, so the GPU's memory is the reference's alone.

On a machine without CUDA, `--smoke` runs the same pieces on tiny shapes: the harness's config
(`make_cfg`) shrunk to 56 px crops and 256 prototypes, its batch (`make_batch`), the
reference's `SSLMetaArch.forward_backward`, per-module clipping, its AdamW and schedules and the
EMA update; and `forward_features` of a hub backbone. Only what needs CUDA is adapted: tensors
stay on the CPU, no FSDP or grad scaler (fp32, the batch's fp16 crops cast up), a gloo group
instead of NCCL.

  python benchmarks/gpu/reference.py --harness=.devref/torch_ref --json_out=r.jsonl \
      --train=vitl14@32,vitl14@64 --features=vitl14:224:256,vitl14:518:64
  python benchmarks/gpu/reference.py --harness=.devref/torch_ref --smoke --train=vitl14@2 \
      --features=vits14:28:2
"""
import contextlib
import io
import json
import pathlib
import socket
import sys
import time
from unittest import mock

from absl import flags

from dinov2_jax import cli

# The harness's recipe shrunk for a CPU smoke run (OmegaConf dotlist).
SMOKE_OVERRIDES = [
    "student.arch=vit_small", "student.ffn_layer=mlp", "crops.global_crops_size=56",
    "crops.local_crops_size=28", "crops.local_crops_number=2", "dino.head_n_prototypes=256",
    "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32", "ibot.head_n_prototypes=256",
    "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "compute_precision.grad_scaler=false",
]
SMOKE_STEPS, SMOKE_WARMUP = 3, 1


def define(flag_values):
    flags.DEFINE_string("harness", ".devref/torch_ref", "the reference harness folder",
                        flag_values=flag_values)
    flags.DEFINE_string("dinov2_src", ".devref/dinov2_src", "folder holding the official "
                        "`dinov2` package source, put first on the path", flag_values=flag_values)
    flags.DEFINE_list("train", [], "CONFIG@BATCH train steps (vits14, vitb14, vitl14, vitg14)",
                      flag_values=flag_values)
    flags.DEFINE_list("features", [], "ARCH:SIZE:BATCH feature extraction rows",
                      flag_values=flag_values)
    flags.DEFINE_bool("smoke", False, "tiny shapes on the CPU", flag_values=flag_values)
    flags.DEFINE_string("json_out", "", "append one JSON line per row to this file",
                        flag_values=flag_values)


def import_harness(harness, dinov2_src):
    """The harness's train_step and features modules; its xFormers shim and the official
    `dinov2` source first on the path."""
    harness, dinov2_src = pathlib.Path(harness).resolve(), pathlib.Path(dinov2_src).resolve()
    missing = [str(path) for path in (harness / "train_step.py", harness / "features.py",
                                      harness / "shim/xformers", dinov2_src / "dinov2")
               if not path.exists()]
    if missing:
        raise cli.ConfigError(f"missing {missing}: benchmarks/gpu/prepare.sh puts the harness "
                              "and the official dinov2 source into .devref/")
    sys.path[:0] = [str(harness / "shim"), str(dinov2_src), str(harness)]
    import features as harness_features  # noqa: PLC0415 (the harness is found at run time)
    import train_step as harness_train  # noqa: PLC0415
    return harness_train, harness_features


def _facts(torch):
    cuda = torch.cuda.is_available()
    return {"impl": "reference", "device": torch.cuda.get_device_name() if cuda else "cpu",
            "platform": "gpu" if cuda else "cpu", "torch": torch.__version__}


def _printed_row(fn, *args):
    """Runs a harness function that prints one JSON line; returns that line as a dict."""
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        fn(*args)
    lines = [line for line in captured.getvalue().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{fn.__name__}{args} printed no result line: "
                           f"{captured.getvalue()[-500:]}")
    return json.loads(lines[-1])


def train_row(torch, harness_train, name):
    """One GPU train-step row through the harness's own `run`."""
    out = _printed_row(harness_train.run, name)
    if "error" in out:
        raise RuntimeError(out["error"])
    return {"benchmark": "train_step", **_facts(torch), "config": name.partition("@")[0],
            "batch": out["batch_per_gpu"], "images_per_s": out["images_per_s"],
            "step_ms_median": 1e3 * out["step_s_median"], "step_ms_min": 1e3 * out["step_s_min"],
            "peak_mem_GiB": out["peak_mem_GiB"], "losses": out["losses"], "harness": out}


def features_row(torch, harness_features, arch, size, batch):
    """One GPU feature-extraction row through the harness's own `bench`."""
    out = _printed_row(harness_features.bench, arch, size, batch)
    return {"benchmark": "features", **_facts(torch), "config": arch, "arch": arch,
            "size": size, "batch": batch, "images_per_s": out["images_per_s"],
            "step_ms_median": out["step_ms"], "peak_mem_GiB": out["peak_mem_GiB"],
            "harness": out}


def _median(seconds):
    return sorted(seconds)[len(seconds) // 2]


def smoke_train_row(torch, harness_train, name):
    """The harness's config, batch and step pieces on the CPU, tiny (see the docstring)."""
    from omegaconf import OmegaConf  # noqa: PLC0415 (installed with the harness's wheels)
    from dinov2.train.ssl_meta_arch import SSLMetaArch  # noqa: PLC0415
    from dinov2.train.train import (  # noqa: PLC0415
        apply_optim_scheduler, build_optimizer, build_schedulers)
    cfg = OmegaConf.merge(harness_train.make_cfg(name), OmegaConf.from_dotlist(SMOKE_OVERRIDES))
    torch.manual_seed(0)
    with mock.patch.object(torch.Tensor, "cuda", lambda self, *args, **kwargs: self):
        model = SSLMetaArch(cfg)
        for key in model.student:  # what prepare_for_distributed_training does before FSDP
            model.teacher[key].load_state_dict(model.student[key].state_dict())
        model.train()
        optimizer = build_optimizer(cfg, model.get_params_groups())
        lr, wd, momentum, teacher_temp, last_layer_lr = build_schedulers(cfg)
        batch = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                 for k, v in harness_train.make_batch(cfg).items()}  # fp16 crops, fp32 model
        seconds = []
        for it in range(SMOKE_WARMUP + SMOKE_STEPS):
            start = time.perf_counter()
            apply_optim_scheduler(optimizer, lr[it], wd[it], last_layer_lr[it])
            optimizer.zero_grad(set_to_none=True)
            losses = model.forward_backward(batch, teacher_temp=teacher_temp[it])
            for module in model.student.values():
                torch.nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
            optimizer.step()
            model.update_teacher(momentum[it])
            seconds.append(time.perf_counter() - start)
    median = _median(seconds[SMOKE_WARMUP:])
    losses = {k: float(v) for k, v in losses.items()}
    if not all(map(lambda v: v == v and abs(v) != float("inf"), losses.values())):
        raise RuntimeError(f"the reference's smoke step diverged: {losses}")
    batch_size = cfg.train.batch_size_per_gpu
    return {"benchmark": "train_step", **_facts(torch), "config": name.partition("@")[0] +
            ":smoke", "batch": batch_size, "images_per_s": batch_size / median,
            "step_ms_median": 1e3 * median, "step_ms_min": 1e3 * min(seconds[SMOKE_WARMUP:]),
            "peak_mem_GiB": None, "losses": losses}


def smoke_features_row(torch, harness_features, arch, size, batch):
    """`forward_features` of the harness's hub backbone on the CPU, tiny."""
    from dinov2.hub.backbones import _make_dinov2_model  # noqa: PLC0415
    torch.manual_seed(0)
    model = _make_dinov2_model(arch_name=harness_features.ARCHS[arch], pretrained=False).eval()
    images = torch.randn(batch, 3, size, size)
    seconds = []
    with torch.no_grad():
        for _ in range(SMOKE_WARMUP + SMOKE_STEPS):
            start = time.perf_counter()
            out = model.forward_features(images)
            seconds.append(time.perf_counter() - start)
    tokens = out["x_norm_patchtokens"].shape[1]
    if tokens != (size // 14) ** 2:
        raise RuntimeError(f"{arch} at {size} px gave {tokens} patch tokens")
    median = _median(seconds[SMOKE_WARMUP:])
    return {"benchmark": "features", **_facts(torch), "config": arch + ":smoke", "arch": arch,
            "size": size, "batch": batch, "images_per_s": batch / median,
            "step_ms_median": 1e3 * median, "peak_mem_GiB": None}


def _check_train(entries):
    for entry in entries:
        config, _, batch = entry.partition("@")
        if not config or (batch and not batch.isdigit()):
            raise cli.ConfigError(f"--train: {entry!r} is not CONFIG or CONFIG@BATCH")


def _parse_features(entries):
    parsed = []
    for entry in entries:
        parts = entry.split(":")
        if len(parts) != 3 or not all(p.isdigit() for p in parts[1:]):
            raise cli.ConfigError(f"--features: {entry!r} is not ARCH:SIZE:BATCH")
        parsed.append((parts[0], int(parts[1]), int(parts[2])))
    return parsed


def _start_distributed(torch, smoke):
    """One local process as rank 0 of 1: the harness's NCCL set-up, or gloo on the CPU."""
    if smoke:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                             rank=0, world_size=1)
    else:
        import dinov2.distributed  # noqa: PLC0415
        dinov2.distributed.enable(overwrite=True)


def main(argv):
    flag_values = cli.parse(argv, define, __doc__)
    _check_train(flag_values.train)
    features = _parse_features(flag_values.features)
    harness_train, harness_features = import_harness(flag_values.harness, flag_values.dinov2_src)
    import torch  # noqa: PLC0415 (after the shim is on the path)
    smoke = flag_values.smoke
    if not smoke and not torch.cuda.is_available():
        raise cli.ConfigError("no CUDA device: the reference is timed on a GPU (--smoke runs "
                              "tiny shapes on the CPU)")
    torch.backends.cuda.matmul.allow_tf32 = not smoke
    if smoke:
        torch.set_num_threads(1)  # tiny shapes: more threads only contend for the cores
    harness_train._patch_for_current_torch()  # noqa: SLF001 (the harness's own set-up)
    unknown = [n for n in flag_values.train if n.partition("@")[0] not in harness_train.CONFIGS]
    unknown += [a for a, _, _ in features if a not in harness_features.ARCHS]
    if unknown:
        raise cli.ConfigError(f"unknown configs {unknown}: choose from "
                              f"{sorted(harness_train.CONFIGS)}")
    if flag_values.train:
        _start_distributed(torch, smoke)
    jobs = ([(f"train {name}", (smoke_train_row if smoke else train_row),
              (torch, harness_train, name),
              {"benchmark": "train_step", "config": name.partition("@")[0],
               "batch": int(name.partition("@")[2] or 0) or None})
             for name in flag_values.train]
            + [(f"features {arch} {size} px batch {batch}",
                (smoke_features_row if smoke else features_row),
                (torch, harness_features, arch, size, batch),
                {"benchmark": "features", "config": arch, "arch": arch, "size": size,
                 "batch": batch})
               for arch, size, batch in features])
    failed = []
    for label, fn, args, names in jobs:
        try:
            row = fn(*args)
        except Exception as error:  # one config failing must not hide the others
            message = f"{type(error).__name__}: {error}"[:2000]
            print(f"{label}: {message}", file=sys.stderr)
            row = {**names, **_facts(torch), "error": message}
            failed.append(label)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        print(json.dumps(row), flush=True)
        if flag_values.json_out:
            with open(flag_values.json_out, "a") as file:
                file.write(json.dumps(row) + "\n")
    if failed:
        raise SystemExit(f"failed: {failed}")


if __name__ == "__main__":
    cli.run(main)
