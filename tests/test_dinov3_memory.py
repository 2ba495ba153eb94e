"""benchmarks/memory.py on ViT-7B/16 (configs/dinov3_vit7b16.py): the numbers add up.

The state rows come from the real sharded state shapes; here they are checked against the
parameter count (DINOv3's MODEL_CARD.md: 6,716M backbone parameters) and the fp32/AdamW
multiples, the Gram rows against their formula, and the printed total against its rows.
"""
import contextlib
import importlib.util
import io
import math
import os

import jax
import pytest

from dinov2_jax import configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def memory():
    spec = importlib.util.spec_from_file_location("memory", os.path.join(REPO,
                                                                         "benchmarks/memory.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vit7b_gram_stage_memory_adds_up(memory):
    config = configs.load(os.path.join(REPO, "configs/dinov3_vit7b16.py:gram"))
    h100 = memory.MACHINES[0]
    assert (h100.devices, h100.hbm_bytes) == (256, 80e9)
    setup = memory.abstract_setup(config)
    state = setup.abstract_state
    count = lambda tree: sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
    backbone, student = count(state["student"]["backbone"]), count(state["student"])
    assert abs(backbone - 6_716e6) < 1e6, backbone  # MODEL_CARD.md: 6,716M
    images, rows = memory.estimate(config, setup.networks, state, h100, 1, 256)
    assert images == 16
    # fp32 params over 256 devices, plus the leaves too small to shard (replicated)
    for name, params in (("student", student), ("teacher", student),
                         ("gradients", student), ("gram_teacher", backbone)):
        assert 4 * params / 256 <= rows[name] <= 4 * params / 256 * 1.01, name
    assert rows["opt_state"] == pytest.approx(2 * rows["student"], rel=1e-3)  # mu and nu
    # the Gram teacher's forward on 2 crops of 512 px: 1 + 4 + 32^2 tokens, d 4096, h 8192
    tokens, patches = 1 + 4 + 32 ** 2, 16 ** 2
    assert rows["Gram teacher forward"] == (16 * 2 * tokens * (10 * 4096 + 3 * 8192) * 2
                                            + 16 * 2 * 32 ** 2 * 4096 * 4)
    assert rows["Gram crops"] == 16 * 4 * 3 * 2 * 512 ** 2
    assert rows["Gram matrices"] == 3 * 2 * 16 * patches ** 2 * 4  # per image (img_level)
    total = sum(rows.values())
    assert 0.2 < total / h100.hbm_bytes < 0.5
    # the printed table: its total row is the sum of its rows, on every machine and mesh
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        memory.print_tables(config, setup.networks, state, memory.MACHINES[:1])
    table = [line.split("|")[1:-1] for line in out.getvalue().splitlines()
             if line.startswith("| ") and not line.startswith("|  ")]
    values = {cells[0].strip(): [float(v) for v in cells[1:]] for cells in table
              if cells[0].strip() not in ("share of HBM",)}
    totals = values.pop("total")
    for column, value in enumerate(totals):
        # each row printed to 4 decimals of GB: the sum of 15 rounded rows is within 1e-3
        assert abs(sum(row[column] for row in values.values()) - value) < 1e-3
    assert totals[0] == pytest.approx(total / 1e9, abs=1e-4)
