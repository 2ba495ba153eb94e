"""Revisited Oxford/Paris: mAP and mP@k (easy, medium, hard) equal a NumPy transcription of
revisitop's compute_map on random features and synthetic ground truth with junk; the dataset
crops queries to their boxes and counts unreadable images; the CLI writes JSON."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from dinov2_jax import weights as weights_module
from dinov2_jax.configs import ConfigError
from dinov2_jax.eval import revisited
from dinov2_jax.models import vit
from tiny_params import random_params


def _compute_ap(ranks, nres):
    """revisitop's compute_ap: trapezoidal precision over the junk-free positive ranks."""
    ap = 0.0
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) / nres / 2.0
    return ap


def _compute_map(ranks, gnd, kappas):
    """revisitop's compute_map: ranks (N, Q) of database indices, gnd [{"ok", "junk"}]."""
    aps, prs, scored = [], [], 0
    for i, query in enumerate(gnd):
        ok = np.asarray(query["ok"])
        if ok.size == 0:
            continue
        junk = np.asarray(query["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], ok)]
        junk_positions = np.arange(ranks.shape[0])[np.isin(ranks[:, i], junk)]
        k, ij = 0, 0
        if len(junk_positions):
            for ip in range(len(pos)):
                while ij < len(junk_positions) and pos[ip] > junk_positions[ij]:
                    k, ij = k + 1, ij + 1
                pos[ip] -= k
        aps.append(_compute_ap(pos, len(ok)))
        pos = pos + 1
        prs.append([(pos <= min(pos.max(), kq)).sum() / min(pos.max(), kq) for kq in kappas])
        scored += 1
    return 100 * np.mean(aps), 100 * np.mean(prs, axis=0)


def _ground_truth(rng, num_queries, num_database):
    entries = []
    for q in range(num_queries):
        picks = rng.permutation(num_database)[:rng.integers(3, 20)]
        cut1, cut2 = sorted(rng.integers(0, len(picks) + 1, 2))
        easy, hard, junk = picks[:cut1], picks[cut1:cut2], picks[cut2:]
        if q == 0:
            hard = picks[:0]  # a query without hard positives is not scored in "hard"
        entries.append({"bbx": [0.0, 0.0, 10.0, 10.0], "easy": easy.tolist(),
                        "hard": hard.tolist(), "junk": junk.tolist()})
    return entries


def test_map_matches_revisitop_transcription():
    rng = np.random.default_rng()
    num_database, num_queries, dim = 60, 9, 8
    database = rng.normal(size=(num_database, dim)).astype(np.float32)
    queries = rng.normal(size=(num_queries, dim)).astype(np.float32)
    gnd = _ground_truth(rng, num_queries, num_database)
    results = revisited.revisited_metrics(database, queries, gnd, chunk_size=4)
    normed_db = database / np.linalg.norm(database, axis=1, keepdims=True)
    normed_q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ranks = np.argsort(-(normed_db @ normed_q.T), axis=0, kind="stable")
    for setting, (ok, junk) in {"easy": (("easy",), ("junk", "hard")),
                                "medium": (("easy", "hard"), ("junk",)),
                                "hard": (("hard",), ("junk", "easy"))}.items():
        setting_gnd = [{"ok": sum((g[k] for k in ok), []), "junk": sum((g[k] for k in junk), [])}
                       for g in gnd]
        expected_map, expected_pr = _compute_map(ranks, setting_gnd, revisited.KS)
        # fp32 similarities vs float64 ranks: random features have no near-ties, so the
        # rankings agree and the APs are equal up to float summation (1e-4 percent).
        assert results[f"revisited/mAP_{setting}"] == pytest.approx(expected_map, abs=1e-4)
        for k, value in zip(revisited.KS, expected_pr):
            assert results[f"revisited/mP@{k}_{setting}"] == pytest.approx(value, abs=1e-4)
    assert results["revisited/queries_hard"] == sum(len(g["hard"]) > 0 for g in gnd) < num_queries
    assert results["revisited/queries_medium"] == sum(len(g["easy"] + g["hard"]) > 0
                                                      for g in gnd)


def test_junk_leaves_the_ranking():
    """A junk image ranked first changes nothing; the same image as a negative halves AP."""
    database = np.eye(3, dtype=np.float32)
    query = np.asarray([[1.0, 0.5, 0.0]], np.float32)  # ranks: 0, 1, 2
    as_junk = [{"bbx": [0, 0, 1, 1], "easy": [1], "hard": [], "junk": [0]}]
    as_negative = [{"bbx": [0, 0, 1, 1], "easy": [1], "hard": [], "junk": []}]
    assert revisited.revisited_metrics(database, query, as_junk)["revisited/mAP_medium"] == \
        pytest.approx(100.0)
    # Positive at rank 1 with one image before it: (0/1 + 1/2) / 2 = 0.25.
    assert revisited.revisited_metrics(database, query, as_negative)["revisited/mAP_medium"] \
        == pytest.approx(25.0)


def _write_dataset(root, rng, num_database=12, num_queries=3):
    (root / "jpg").mkdir(parents=True)
    names = [f"img_{i}" for i in range(num_database)]
    query_names = [f"query_{i}" for i in range(num_queries)]
    for name in names + query_names:
        pixels = rng.integers(0, 255, (40, 52, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "jpg" / f"{name}.jpg")
    (root / "jpg" / "img_3.jpg").write_bytes(b"not a jpeg")  # unreadable database image
    gnd = [{"bbx": [4.2, 5.0, 30.0, 33.0], "easy": [1, 2], "hard": [4], "junk": [5]}
           for _ in query_names]
    with open(root / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": names, "qimlist": query_names, "gnd": gnd}, f)


def test_dataset_crops_queries_and_cli_writes_json(tmp_path):
    rng = np.random.default_rng()
    _write_dataset(tmp_path / "roxford5k", rng)
    dataset = revisited.open_revisited(f"roxford5k:{tmp_path / 'roxford5k'}")
    crop = dataset.queries[0]["image"]
    assert crop.shape == (33 - 5, 30 - 4, 3)  # box [4.2, 5, 30, 33] rounded like PIL's crop
    model = vit.DinoVisionTransformer(embed_dim=32, depth=2, num_heads=2, patch_size=8,
                                      img_size=32, layerscale=1.0)
    weights = tmp_path / "weights"
    weights_module.save(str(weights), model, random_params(model))
    output = tmp_path / "out" / "revisited.json"
    revisited.main(["revisited", f"--weights={weights}", f"--dataset=roxford5k:"
                    f"{tmp_path / 'roxford5k'}", "--size=32", "--batch_size=8",
                    f"--output={output}"])
    record = json.loads(output.read_text())["results"]
    assert 0.0 < record["mAP_medium"] <= 100.0 and 0.0 < record["mAP_hard"] <= 100.0
    assert record["unreadable_database"] == 1.0 and record["queries_medium"] == 3.0


def test_bad_ground_truth_is_a_clear_error(tmp_path):
    root = tmp_path / "rparis6k"
    root.mkdir()
    with open(root / "gnd_rparis6k.pkl", "wb") as f:
        pickle.dump({"imlist": ["a"], "qimlist": ["q"],
                     "gnd": [{"bbx": [0, 0, 1, 1], "easy": [7], "hard": [], "junk": []}]}, f)
    with pytest.raises(ConfigError, match="outside the 1-image database"):
        revisited.open_revisited(f"rparis6k:{root}")
    with pytest.raises(ConfigError, match="expected roxford5k:ROOT"):
        revisited.open_revisited(f"oxford:{root}")
