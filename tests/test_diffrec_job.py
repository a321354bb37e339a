"""The DiffRec job end to end on 2 real ranks: sets shards -> training -> validation-selected
test, on a small catalog with planted structure that popularity cannot see.

Data: 2 clusters of 20 items; each of 120 users has 8 train, 2 validation and 2 test items from
its own cluster (the last user none in test: skipped and counted). At test, the 8 train and 2
validation items are masked: 30 candidates, 10 of them in the user's cluster, 2 of those the
targets. Every item is about equally popular, so the popularity ranker sits near a random
ranker (Recall@10 ~ 10/30 ~ 0.33); a model that learns the clusters ranks the 10 cluster items
first (Recall@10 ~ 1; measured 0.99). A model that did not learn stays near 0.33; one whose test
forgot to mask the validation items ranks 12 cluster items for 10 slots (Recall@10 ~ 0.83):
both fail the 0.9 bound.
"""

import json

import numpy as np

from distributed_harness import run_distributed

USERS, ITEMS, CLUSTER = 120, 40, 20


def _write_data(folder):
    rng = np.random.default_rng(0)
    splits = {"train": [], "valid": [], "test": []}
    for u in range(USERS):
        c = u % 2
        items = rng.permutation(CLUSTER)[:12] + c * CLUSTER
        splits["train"] += [[u, i] for i in items[:8]]
        splits["valid"] += [[u, i] for i in items[8:10]]
        if u != USERS - 1:
            splits["test"] += [[u, i] for i in items[10:12]]
    for s, pairs in splits.items():
        np.save(folder / f"{s}_list.npy", np.array(pairs, dtype=np.int64))
    np.save(folder / "item_emb.npy", rng.normal(size=(ITEMS, 4)).astype(np.float32))


def _job(data_dir, out_dir):
    from recsys_dist.config import load_config
    from recsys_dist.train.diffrec_job import fit

    cfg = load_config("configs/ml1m-diffrec_diffrec.yaml", [
        f"data.data_dir={data_dir}", f"data.shards_url={out_dir}/shards", f"output_dir={out_dir}", "name=job",
        "data.source={files: {train: train_list.npy, valid: valid_list.npy, test: test_list.npy}, format: pairs_npy, protocol: given}", "diffrec.item_emb=item_emb.npy",
        "diffrec.dims=[16]", "diffrec.emb_size=4", "diffrec.steps=5", "train.batch_size=20",
        "train.lr=0.01", "sparse.lr=0.01", "train.max_epochs=40", "train.eval_every_epochs=10",
        "train.patience=0", "eval.ks=[10]", "eval.select_metric=Recall@10", "eval.batch_size=32"])
    return fit(cfg)


def test_two_rank_job_learns_what_popularity_cannot(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _write_data(data)
    out = run_distributed(_job, 2, str(data), str(tmp_path))
    strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}  # noqa: E731
    assert strip(out[0]["test"]) == strip(out[1]["test"])  # every rank returns the same metrics
    m = json.loads((tmp_path / "job" / "metrics.json").read_text())
    test, pop = m["test"], m["popularity_test"]
    assert test["num_users"] == USERS - 1 and test["num_skipped_users"] == 1
    assert pop["Recall@10"] < 0.45, pop
    assert test["Recall@10"] > 0.9, test
    assert len(m["validation"]) == 4 and m["selected_step"] in [s for s, _ in m["validation"]]


def test_compare_table_gives_set_models_their_own_columns():
    from launcher.commands import compare_table

    seq = {"test": {**{k: 0.1 for k in ["HR@10", "NDCG@10", "HR@20", "NDCG@20", "HR@50", "NDCG@50"]}, "num_users": 5}}
    sets = {"test": {k: 0.2 for k in ["Recall@10", "NDCG@10", "Recall@20", "NDCG@20", "Recall@50", "NDCG@50",
                                      "HR@10", "HR@20", "HR@50"]}}
    sets["test"]["num_users"] = 7
    text = compare_table([("ml1m", "sasrec", seq), ("ml1m-diffrec", "diffrec", sets)], 2)
    seq_block, set_block = text.split("\n\n")
    assert "HR@10" in seq_block.splitlines()[0] and "| ml1m | sasrec | 10.00" in seq_block
    assert "Recall@10" in set_block.splitlines()[0] and "| ml1m-diffrec | diffrec | 20.00" in set_block
