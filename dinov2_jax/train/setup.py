"""Everything a run builds before its first step, in one place: `build(config, mesh)`.

Networks, schedules, the optimizer, the abstract train state with its shardings, the
born-sharded initial state, the jitted (donating) train step and its FLOPs. The loop, the
benchmarks, the memory report and the tests all put a run together through `build`.
"""
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dinov2_jax import configs, flops, parallel, weights
from dinov2_jax.train import checkpoint as checkpoint_lib
from dinov2_jax.train import optim, schedules as schedules_lib
from dinov2_jax.train import state as state_lib
from dinov2_jax.train import step as step_lib


@dataclasses.dataclass(frozen=True)
class Setup:
    """A run's pieces; `abstract_state` leaves carry their shardings."""
    config: Any
    mesh: Any
    networks: state_lib.Networks
    schedules: Any
    optimizer: Any
    init_state: Callable  # rng -> step-0 state (not jitted)
    abstract_state: Any
    state_shardings: Any

    def create_state(self):
        """The step-0 state, born in its shards (never whole on one device)."""
        rng = jax.random.PRNGKey(self.config.train.seed)
        return jax.jit(self.init_state, out_shardings=self.state_shardings)(rng)

    def train_step(self, batch_shardings):
        """The jitted train step for batches with `batch_shardings`; donates the state."""
        step = step_lib.make_train_step(self.networks, self.config, self.optimizer,
                                        self.schedules, mesh=self.mesh)
        return jax.jit(step, in_shardings=(self.state_shardings, batch_shardings),
                       out_shardings=(self.state_shardings, None), donate_argnums=0)

    def step_flops(self, masked_rows):
        """Model FLOPs of one step of the global batch with `masked_rows` iBOT buffer rows."""
        return flops.train_step_flops(self.networks, self.config, self.config.train.batch_size,
                                      masked_rows)

    def final_models(self, state):
        """{metric prefix: (model without drop path, params)} of the run's final model: the
        EMA teacher's backbone, which evaluations and exports use."""
        return {"": (self.networks.backbone.clone(drop_path_rate=0.0),
                     state["teacher"]["backbone"])}

    def memory_trees(self, state):
        return {name: state[name] for name in ("student", "teacher", "opt_state", "gram_teacher")
                if name in state}

    def parameter_trees(self, state):
        return {"student": state["student"]}


def build(config, mesh):
    """The Setup of `config` on `mesh` (a Mesh, or an AbstractMesh for shapes only)."""
    networks = state_lib.build_networks(config)
    schedules = schedules_lib.make_schedules(config)
    fresh = functools.partial(state_lib.init_student, networks, config)
    init_student = (functools.partial(_pretrained_student, fresh, config)
                    if config.student.pretrained_weights else fresh)
    rng = jax.random.PRNGKey(config.train.seed)
    optimizer = optim.make_optimizer(config, jax.eval_shape(fresh, rng), schedules)

    gram_teacher = _gram_teacher(config, jax.eval_shape(fresh, rng)["backbone"])

    def init_state(rng):
        return state_lib.create_train_state(networks, config, optimizer, rng, init_student(rng),
                                            gram_teacher)

    abstract = jax.eval_shape(init_state, rng)
    shardings = parallel.state_shardings(abstract, mesh, config.mesh)
    abstract = jax.tree.map(lambda s, h: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=h),
                            abstract, shardings)
    return Setup(config, mesh, networks, schedules, optimizer, init_state, abstract, shardings)


def _gram_teacher(config, expected):
    """The Gram teacher's backbone from gram.ckpt (strict shapes), or None."""
    if not (state_lib.has_gram_teacher(config) and config.gram.ckpt):
        return None
    _, backbone = weights.load(config.gram.ckpt)
    difference = checkpoint_lib.first_difference(
        jax.tree.map(lambda x: str(np.shape(x)), expected),
        jax.tree.map(lambda x: str(np.shape(x)), backbone))
    if difference:
        raise configs.ConfigError(f"config error at gram.ckpt: {config.gram.ckpt} does not "
                                  f"match student.arch: {difference}")
    return jax.tree.map(lambda x, e: np.asarray(x, e.dtype), backbone, expected)


def _pretrained_student(fresh, config, rng):
    """The student with its backbone from student.pretrained_weights (strict), heads fresh."""
    student = fresh(rng)
    _, backbone = weights.load(config.student.pretrained_weights)
    expected = jax.tree.map(lambda x: str(np.shape(x)), student["backbone"])
    got = jax.tree.map(lambda x: str(np.shape(x)), backbone)
    difference = checkpoint_lib.first_difference(expected, got)
    if difference:
        raise configs.ConfigError(
            f"config error at student.pretrained_weights: {config.student.pretrained_weights} "
            f"does not match student.arch: {difference}")
    return {**student, "backbone": jax.tree.map(jnp.asarray, backbone)}
