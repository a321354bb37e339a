"""The DiffRec / T-DiffRec job: per-user interaction sets -> the N-wide layers in the sharded
item table + the dense core under DeepSpeed -> validate -> test once.

Read top to bottom: :func:`train_step` is one batch, :func:`score_queries` the reverse chain at
evaluation, :func:`evaluate_split` the exact multi-target ranking, :func:`fit` the whole job.
The model math is ``recsys_dist/models/diffrec/`` (the dense single-process reference is
``DiffRec``); the placement of its two N-wide layers is ``recsys_dist/sparse/wide.py``.

Protocol (DiffRec's, ``main.py`` of the official code): the input of a user is the training
interaction vector (T-DiffRec: its temporal weights); validation ranks every item but the
user's training items against the validation items, the test every item but the training and
validation items against the test items; users without held-out items of a split are skipped
and counted. Selection on validation (``eval.select_metric``, the official Recall@20), test
once on the selected state. Exact metrics (``recsys_dist.eval.multi``).

Randomness: the timesteps of the global batch come from a (seed, step) stream, the noise and
the input-dropout mask of every column from (seed, step, column chunk) streams
(``sparse.wide.column_noise``): the same for every world size, so 2 ranks train exactly what
one process trains on the same global batches (``tests/test_diffrec_sharded.py``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from recsys_dist.config import JobConfig, default_data_dir, stream_seed
from recsys_dist.eval import MultiMetricAccumulator, rank_target_sets
from recsys_dist.models.diffrec import (DiffRecConfig, DiffRecDense, LDiffRecDense, combine_ldiffrec_loss, kl_weight_at,
                                        kmeans, temporal_weights)
from recsys_dist.sparse import ShardedItemTable, check_sparse_config
from recsys_dist.sparse.wide import WideLayers, WideLayout, column_noise, jagged_to_padded
from recsys_dist.distributed import (all_reduce_mean, barrier, gather_rows, init_distributed, max_over_ranks, multi_rank,
                                     pick_device, rank_and_world, seed_everything)
from recsys_dist.train.engine import build_engine
from recsys_dist.train.report import RunReport, peak_rss_gib_per_rank, setup_logging
from recsys_dist.train.catalog_loss import ShardedColumnMSE
from recsys_dist.train.step import NonFiniteLossError

log = logging.getLogger("recsys_dist.train")

SET_PROTOCOLS = ("given", "temporal")  # data whose records carry per-user train / valid / test sets


def check_diffrec_config(cfg: DiffRecConfig) -> DiffRecConfig:
    """The validated config (``__post_init__``) and the subset the sharded job runs."""
    cfg = replace(cfg)
    if cfg.latent and (len(cfg.ae_dims) != 1 or not cfg.ae_shared_decoder):
        raise ValueError("diffrec.variant=l-diffrec in the sharded job: one encoder layer per cluster "
                         "(diffrec.ae_dims of one width) and the shared decoder, as the official recipes")
    if cfg.mean_type != "x0":
        raise ValueError("diffrec.mean_type=eps is not in the sharded job yet (its final scores are not a dot "
                         "product with the item rows); the official ML-1M recipes predict x0")
    if cfg.sampling_steps != 0 or cfg.sampling_noise:
        raise ValueError("diffrec.sampling_steps > 0 / sampling_noise are not in the sharded job yet "
                         "(the official ML-1M recipes use 0 / false)")
    return cfg


def user_values(offsets: torch.Tensor, cfg: DiffRecConfig) -> torch.Tensor | None:
    """x_0 values of each user's train items (in file order): T-DiffRec's weights
    (``temporal_weights``), None (all 1) for DiffRec."""
    if not cfg.temporal:
        return None
    users = torch.repeat_interleave(torch.arange(offsets.numel() - 1), offsets[1:] - offsets[:-1])
    return temporal_weights(users, cfg.w_min, cfg.w_max).float()


def _input(wide: WideLayers, x_block: torch.Tensor, cfg: DiffRecConfig) -> torch.Tensor:
    """norm (global row norms, F.normalize's eps) before the first layer."""
    if cfg.norm:
        x_block = x_block / wide.row_norms(x_block).clamp(min=1e-12)[:, None]
    return x_block


def train_step(engine, wide: WideLayers, cfg: DiffRecConfig, offsets: torch.Tensor, items: torch.Tensor,
               step: int, seed: int) -> torch.Tensor:
    """Forward, backward and update for one batch of this rank's users; returns the global mean
    loss (detached; identical on every rank).

    offsets (b + 1,), items (n,): this rank's users' train items as 0-based item indices, in
    file order (jagged); b equal on every rank.
    """
    model: DiffRecDense = engine.module
    diffusion = model.diffusion
    rank, _ = rank_and_world()
    device = wide.table.dmp.device
    ids, vals, sizes = wide.gather_users(offsets, items, user_values(offsets, cfg))
    if len(set(sizes)) > 1:  # identical decision on every rank (sizes are all-gathered)
        raise ValueError(f"DiffRec train step {step}: ranks have different batch sizes {sizes}")
    batch = sum(sizes)
    gen = torch.Generator().manual_seed(stream_seed(seed, "diffrec-t", step))
    t, pt = diffusion.sample_timesteps(torch.rand(batch, generator=gen, dtype=torch.float64))
    t, pt = t.to(device), pt.to(device)
    x0 = wide.dense_block(ids, vals).to(device)
    eps = column_noise(seed, "diffrec-eps", step, batch, wide.item_lo, wide.item_hi).to(device)
    xt = diffusion.q_sample(x0, t, eps)
    x_in = _input(wide, xt, cfg)
    engine.train()
    if cfg.dropout > 0:
        keep = column_noise(seed, "diffrec-dropout", step, batch, wide.item_lo, wide.item_hi, "uniform") >= cfg.dropout
        x_in = x_in * keep.to(device) / (1.0 - cfg.dropout)
    w_in, w_out, b_out = wide.block_rows()
    start = sum(sizes[:rank])
    own = slice(start, start + sizes[rank])
    dtype = next(model.parameters()).dtype
    pre = wide.first(x_in, w_in, sizes)
    h = engine(pre.to(dtype), t[own]).float()
    out = wide.last(h, w_out, b_out, sizes)
    mse = ShardedColumnMSE(wide)(x0, out)
    loss_all, history = diffusion.weigh(t, pt, mse)
    loss = loss_all[own].mean()
    reduced = loss_all.detach().mean()
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(f"non-finite loss {reduced.item()} at step {step} (rank {rank}); "
                                 "stopped before this step's update")
    diffusion.update_history(t, history)  # the global batch, in global order: identical on every rank
    engine.backward(loss)
    engine.step()
    wide.table.step_optimizer()
    return reduced


def encoder_inputs(model: LDiffRecDense, wide: WideLayers, x_block: torch.Tensor, w_in: torch.Tensor,
                   cluster_block: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """(b_own, 2 L) the cluster encoders' products without bias: for cluster c,
    x[:, items of c] @ W_enc_c, summed over the ranks' column blocks (each row of the table holds
    its cluster's encoder weights in its first 2 lat_c columns)."""
    parts = []
    for c, w in enumerate(model.latent_dims):
        cols = cluster_block == c
        parts.append(x_block[:, cols].to(w_in.dtype) @ w_in[cols, :2 * w])
    return wide.reduce_own(torch.cat(parts, dim=1), sizes)


def ldiffrec_train_step(engine, wide: WideLayers, cfg: DiffRecConfig, cluster_block: torch.Tensor,
                        offsets: torch.Tensor, items: torch.Tensor, step: int, seed: int, epoch: int) -> torch.Tensor:
    """L-DiffRec's step (``LDiffRec.loss_terms`` on the column blocks): the VAE's input dropout
    per column from the column streams, the latent noise of the global batch from a (seed, step)
    stream; the multinomial reconstruction -sum_j x_j log softmax_j = -sum_j x_j logit_j +
    (sum_j x_j) LSE_j with the log-sum-exp over every rank's columns. Returns the global mean loss."""
    model: LDiffRecDense = engine.module
    device = wide.table.dmp.device
    rank, _ = rank_and_world()
    ids, vals, sizes = wide.gather_users(offsets, items, user_values(offsets, cfg))
    if len(set(sizes)) > 1:
        raise ValueError(f"L-DiffRec train step {step}: ranks have different batch sizes {sizes}")
    batch, width = sum(sizes), model.latent_size
    own = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    gen = torch.Generator().manual_seed(stream_seed(seed, "diffrec-t", step))
    t_u = torch.rand(batch, generator=gen, dtype=torch.float64)
    gen = torch.Generator().manual_seed(stream_seed(seed, "ldiffrec-latent", step))
    eps, z_eps = torch.randn(batch, width, generator=gen), torch.randn(batch, width, generator=gen)
    keep = torch.rand(batch, width, generator=gen) >= cfg.dropout
    x = wide.dense_block(ids, vals).to(device)
    if cfg.ae_dropout > 0:
        x_keep = column_noise(seed, "ldiffrec-xdrop", step, batch, wide.item_lo, wide.item_hi, "uniform") >= cfg.ae_dropout
        x = x * x_keep.to(device) / (1.0 - cfg.ae_dropout)
    engine.train()
    w_in, w_out, b_out = wide.block_rows()
    pre = encoder_inputs(model, wide, x, w_in, cluster_block, sizes)
    dtype = next(model.parameters()).dtype
    out = engine(pre.to(dtype), t_u[own].to(device), eps[own].to(device), z_eps[own].to(device),
                 keep[own].to(device) if cfg.dropout > 0 else None)
    logits = wide.last(out["pred_x0"].float(), w_out, b_out, sizes)  # (B, block): decoder over this rank's items
    recon = ShardedColumnMSE(wide).multinomial_nll(x, logits)[own].mean()
    vae_loss = recon + kl_weight_at(cfg, step) * out["kl"].float()
    loss = combine_ldiffrec_loss(cfg, out["loss"].float().mean(), vae_loss, epoch)
    reduced = all_reduce_mean(loss)
    if not torch.isfinite(reduced):
        raise NonFiniteLossError(f"non-finite loss {reduced.item()} at step {step} (rank {rank}); "
                                 "stopped before this step's update")
    model.diffusion.update_history(gather_rows(out["t"].cpu(), sizes), gather_rows(out["history"].cpu(), sizes))
    engine.backward(loss)
    engine.step()
    wide.table.step_optimizer()
    return reduced


@torch.no_grad()
def score_queries(model: DiffRecDense | LDiffRecDense, wide: WideLayers, cfg: DiffRecConfig, offsets: torch.Tensor,
                  items: torch.Tensor, cluster_block: torch.Tensor | None = None) -> torch.Tensor:
    """(b, h_out + 1) queries [h, 1] of this rank's users (collective): the reverse chain run on
    the column blocks from x = the train vector; the scores of the last step, x0_hat = h W_out^T
    + b_out, are queries . [W_out | b_out] rows (the official chain returns the posterior mean at
    t = 0, whose coefficients are 1 and 0 up to rounding: the same order)."""
    model.eval()
    diffusion = model.diffusion
    rank, _ = rank_and_world()
    ids, vals, sizes = wide.gather_users(offsets, items, user_values(offsets, cfg))
    w_in, w_out, b_out = (p.detach() for p in wide.block_rows())
    x = wide.dense_block(ids, vals).to(w_in.device)
    dtype = next(model.parameters()).dtype
    if isinstance(model, LDiffRecDense):  # encode (mu), the reverse chain on the latent, decode = [z, 1] . rows
        assert cluster_block is not None
        z = model.infer_latent(encoder_inputs(model, wide, x, w_in, cluster_block, sizes).to(dtype)).float()
        return torch.cat([z, torch.ones(z.shape[0], 1, device=z.device)], dim=1)
    h = None
    for i in reversed(range(diffusion.steps)):
        t = torch.full((x.shape[0],), i, dtype=torch.long, device=x.device)
        pre = wide.first(_input(wide, x, cfg), w_in, sizes)
        h = model(pre.to(dtype), t[:sizes[rank]]).float()
        if i > 0:
            x0_hat = wide.last(h, w_out, b_out, sizes)
            x, _ = diffusion.gd.posterior(x0_hat, x, t)
    assert h is not None
    return torch.cat([h, torch.ones(h.shape[0], 1, device=h.device)], dim=1)


def _union(*parts: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-user concatenation of several jagged lists (offsets, items) of the same users."""
    users = torch.cat([torch.repeat_interleave(torch.arange(off.numel() - 1), off[1:] - off[:-1]) for off, _ in parts])
    items = torch.cat([it for _, it in parts])
    order = torch.argsort(users, stable=True)
    lens = torch.bincount(users, minlength=parts[0][0].numel() - 1)
    return torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(lens, 0)]), items[order]


def evaluate_split(model: DiffRecDense | LDiffRecDense, wide: WideLayers, cfg: JobConfig, split: str, url: str,
                   popularity: torch.Tensor | None = None, cluster_block: torch.Tensor | None = None
                   ) -> dict[str, float]:
    """Exact multi-target metrics of ``split`` ("valid" | "test") over every user (collective).
    ``popularity`` (num_rows,) train counts: rank by them instead (the popularity baseline)."""
    rank, world = wide.table.rank, wide.table.world_size
    dcfg = check_diffrec_config(cfg.diffrec)
    reader = user_batches(url, rank, world, cfg.eval.batch_size)
    lo, hi = wide.table.score_block()
    if popularity is None:
        block = wide.table.rows(lo, hi)[:, wide.layout.in_width:wide.layout.used]  # [W_out | b_out] rows (row 0: zeros)
    else:
        block = popularity[lo:hi, None].double().to(wide.table.dmp.device)
    acc = MultiMetricAccumulator(cfg.eval.ks, cfg.eval.ties)
    batches = list(reader)
    empty = {"train": (torch.zeros(1, dtype=torch.long), torch.zeros(0, dtype=torch.long))}
    for i in range(max_over_ranks(len(batches))):
        b = batches[i] if i < len(batches) else None
        train = b["train"] if b is not None else empty["train"]
        train = (train[0], train[1] - 1)  # table ids -> 0-based item indices
        if popularity is None:
            queries = score_queries(model, wide, dcfg, *train, cluster_block=cluster_block)
        else:
            queries = torch.ones(train[0].numel() - 1, 1, dtype=torch.float64, device=block.device)
        if b is None:
            targets = torch.zeros(0, 1, dtype=torch.long)
            masked = torch.zeros(0, 1, dtype=torch.long)
        else:
            targets = jagged_to_padded(*b[split])  # table ids, 0 = padding
            masked = jagged_to_padded(*_union(b["train"], *([b["valid"]] if split == "test" else [])))
        acc.update(rank_target_sets(queries.to(block.dtype), targets.to(block.device), block, lo,
                                    wide.table.num_rows, masked.to(block.device),
                                    ks=cfg.eval.ks, ties=cfg.eval.ties, item_chunk=cfg.eval.item_chunk))
    return acc.compute()


def train_item_counts(url: str, num_rows: int, rank: int, world: int) -> torch.Tensor:
    """(num_rows,) float64 train interaction counts per table row (collective)."""
    counts = torch.zeros(num_rows, dtype=torch.float64)
    for b in user_batches(url, rank, world, 4096):
        counts.index_add_(0, b["train"][1].long(), torch.ones(b["train"][1].numel(), dtype=torch.float64))
    if world > 1:
        dist.all_reduce(counts)
    return counts


def user_batches(url: str, rank: int, world: int, batch_users: int, **kw: Any):
    """This rank's batches of whole users ({"user", "train"/"valid"/"test": (offsets, items)})."""
    from shards.dataset import SequenceDataset

    return SequenceDataset(url, "records", batch_users, rank, world, **kw)


def ensure_sets_shards(cfg: JobConfig, rank: int) -> tuple[str, dict]:
    """The job's shards (built by rank 0 when missing, like every job's: loop.ensure_shards)
    and their manifest, checked to hold per-user sets."""
    from recsys_dist.train.data import ensure_shards

    if cfg.eval.mask_scope != "seen":
        raise ValueError(f"eval.mask_scope={cfg.eval.mask_scope}: a DiffRec job always masks the user's whole "
                         "earlier sets (train; train + valid for test); leave eval.mask_scope=seen")
    manifest = ensure_shards(cfg, rank)
    if manifest["protocol"] not in SET_PROTOCOLS:
        raise ValueError(f"model.name=diffrec needs per-user train / valid / test sets (data.source.protocol "
                         f"{' | '.join(SET_PROTOCOLS)}, e.g. base: [datasets/ml1m-diffrec_clean.yaml]); "
                         f"data.dataset={cfg.data.dataset} is {manifest['protocol']!r}")
    return cfg.data.resolved_shards_url(), manifest


def load_item_emb(cfg: JobConfig, num_items: int):
    """``diffrec.item_emb`` (resolved against the data dir) as float32 (num_items, d)."""
    import io
    import os

    import fsspec
    import numpy as np

    path = cfg.diffrec.item_emb
    if path is None:
        raise ValueError("L-DiffRec with diffrec.n_cate > 1 clusters items by their embeddings: set diffrec.item_emb")
    if "://" not in path and not os.path.isabs(path):
        path = os.path.join(cfg.data.data_dir or default_data_dir(), path)
    with fsspec.open(path, "rb") as f:
        emb = np.load(io.BytesIO(f.read()), allow_pickle=False)
    if emb.ndim != 2 or emb.shape[0] != num_items:
        raise ValueError(f"{path}: shape {emb.shape}, expected ({num_items}, d): one row per item")
    return emb.astype(np.float32)


def item_clusters(cfg: DiffRecConfig, num_items: int, item_emb=None, seed: int = 0) -> torch.Tensor:
    """(N,) L-DiffRec's cluster of every item: k-means of the item embeddings (one seeded
    stream: the same on every rank), or one cluster."""
    if cfg.n_cate == 1:
        return torch.zeros(num_items, dtype=torch.long)
    if item_emb is None:
        raise ValueError("L-DiffRec with diffrec.n_cate > 1 needs the item embeddings (item_emb.npy)")
    gen = torch.Generator().manual_seed(stream_seed(seed, "kmeans"))
    labels, _ = kmeans(torch.as_tensor(item_emb), cfg.n_cate, gen, cfg.kmeans_tol, cfg.kmeans_max_iter)
    return labels


def build_parts(cfg: JobConfig, num_items: int, device: torch.device,
                clusters: torch.Tensor | None = None) -> tuple[Any, WideLayers, torch.Tensor | None]:
    """The dense part under DeepSpeed and the N-wide layers in the item table; L-DiffRec also
    returns the cluster of each of this rank's items (its column block)."""
    dcfg = check_diffrec_config(cfg.diffrec)
    check_sparse_config(cfg.sparse)
    if not dcfg.latent:
        model = DiffRecDense(dcfg, num_items)
        layout = WideLayout(model.core.in_width, model.core.out_width)
        table = ShardedItemTable.create(num_items + 1, layout.dim, cfg.sparse, device, cfg.train.batch_size,
                                        cfg.train.seed, column_std=layout.column_std(*model.wide_init_stds()))
        return build_engine(model, cfg.train, device), WideLayers(table, layout), None
    assert clusters is not None and clusters.numel() == num_items
    sizes = torch.bincount(clusters, minlength=dcfg.n_cate).tolist()
    if min(sizes) == 0:
        raise ValueError(f"L-DiffRec: an empty item cluster (sizes {sizes})")
    model = LDiffRecDense(dcfg, sizes)
    model.vae_lr = cfg.sparse.lr  # the VAE's lr (official lr1) for its biases, as for its table rows
    layout = WideLayout(2 * max(model.latent_dims), model.latent_size)  # [encoder of its cluster | decoder | b]
    enc_stds, dec_std = model.init_stds()
    table = ShardedItemTable.create(num_items + 1, layout.dim, cfg.sparse, device, cfg.train.batch_size,
                                    cfg.train.seed, column_std=layout.column_std(1.0, dec_std, 0.0))
    with torch.no_grad():  # each row's encoder part: its cluster's xavier std, zero past 2 lat_c
        for row_off, _, shard in table.local_shards():
            rows = torch.arange(row_off, row_off + shard.shape[0])
            cid = clusters[(rows - 1).clamp(min=0)]
            scale = torch.zeros(shard.shape[0], layout.in_width)
            for c, (std, w) in enumerate(zip(enc_stds, model.latent_dims)):
                scale[cid == c, :2 * w] = std
            scale[rows == 0] = 0.0
            shard[:, :layout.in_width].mul_(scale.to(shard.device, shard.dtype))
    wide = WideLayers(table, layout)
    return build_engine(model, cfg.train, device), wide, clusters[wide.item_lo:wide.item_hi].to(table.dmp.device)


def fit(cfg: JobConfig) -> dict[str, Any]:
    """Train and evaluate one DiffRec job; returns (every rank) what metrics.json holds.

    Runs whole epochs (``train.max_epochs``; with ``max_epochs = 0``, ``train.max_steps`` rounded
    up to whole epochs) of whole global batches (each rank's last partial batch waits for a
    later epoch's shuffle), validating every ``train.eval_every_epochs`` and at the end. No
    resumable checkpoints yet (``checkpoint.*`` is ignored): a DiffRec run on ML-1M takes
    minutes; the selected state is kept in memory."""
    from tqdm import tqdm

    from recsys_dist.train.trainer import Snapshot

    device = pick_device(cfg.train.device)
    rank, world = init_distributed(device, cfg.train.collective_timeout_s)
    run_dir = cfg.run_dir()
    setup_logging(rank, run_dir)
    seed_everything(cfg.train.seed)
    dcfg = check_diffrec_config(cfg.diffrec)
    log.info("job %s: %s on %s, %d rank(s), device %s", cfg.name, dcfg.variant, cfg.data.dataset, world, device)
    url, manifest = ensure_sets_shards(cfg, rank)
    num_items = int(manifest["num_items"])
    clusters = None
    if dcfg.latent:
        emb = load_item_emb(cfg, num_items) if dcfg.n_cate > 1 else None
        clusters = item_clusters(dcfg, num_items, emb, cfg.train.seed)
        log.info("L-DiffRec: %d item clusters of sizes %s", dcfg.n_cate,
                 torch.bincount(clusters, minlength=dcfg.n_cate).tolist())
    engine, wide, cluster_block = build_parts(cfg, num_items, device, clusters)
    report = RunReport(run_dir, rank)
    from shards.plan import RECORDS, plan_batches

    reader = user_batches(url, rank, world, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                          drop_last=True, window_blocks=1,
                          max_batches=min(plan_batches(manifest, RECORDS, cfg.train.batch_size, world, True)))
    steps_per_epoch = len(reader)
    if steps_per_epoch == 0:
        raise ValueError(f"{url}: too few users for batch {cfg.train.batch_size} x {world} ranks")
    epochs = cfg.train.max_epochs if cfg.train.max_epochs > 0 else -(-cfg.train.max_steps // steps_per_epoch)
    every = max(cfg.train.eval_every_epochs, 1)
    log.info("%d steps per epoch (%d users x %d ranks); up to %d epochs, validate every %d", steps_per_epoch,
             cfg.train.batch_size, world, epochs, every)
    bar = tqdm(total=epochs * steps_per_epoch, desc=f"train {cfg.name}", disable=rank != 0, dynamic_ncols=True)
    step, best, best_value, best_step, t_train, timed_steps, t_timed = 0, None, float("-inf"), None, 0.0, 0, 0.0
    stopped_early = False
    for epoch in range(epochs):
        reader.set_epoch(epoch)
        t0 = time.perf_counter()
        for batch in reader:
            offsets, items = batch["train"]
            t_step = time.perf_counter()
            if dcfg.latent:
                loss = ldiffrec_train_step(engine, wide, dcfg, cluster_block, offsets, items - 1, step,
                                           cfg.train.seed, epoch)
            else:
                loss = train_step(engine, wide, dcfg, offsets, items - 1, step, cfg.train.seed)
            step += 1
            if step > 2:  # the first steps pay for lazy initialisation
                timed_steps, t_timed = timed_steps + 1, t_timed + time.perf_counter() - t_step
            if step % cfg.train.log_every == 0 or step == 1:
                report.loss(step, loss.item())
                bar.set_postfix(loss=f"{loss.item():.4f}", epoch=epoch)
            bar.update(1)
        t_train += time.perf_counter() - t0
        if (epoch + 1) % every == 0 or epoch + 1 == epochs:
            t0 = time.perf_counter()
            metrics = evaluate_split(engine.module, wide, cfg, "valid", url, cluster_block=cluster_block)
            metrics.update(seconds=time.perf_counter() - t0, epoch=epoch + 1, train_seconds=t_train)
            report.validation(step, metrics)
            value = metrics[cfg.eval.select_metric]
            log.info("epoch %d val %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in metrics.items()
                                                           if k.startswith(("Recall@", "NDCG@"))))
            if value > best_value:
                best_value, best_step = value, step
                best = Snapshot.take(step, engine, wide.table)
            since = sum(1 for s, _ in report.val if s > best_step)
            if cfg.train.patience > 0 and since >= cfg.train.patience:
                stopped_early = True
                log.info("early stop after epoch %d: %d validations without a better %s", epoch + 1, since,
                         cfg.eval.select_metric)
                break
    bar.close()
    if best is None:
        raise RuntimeError("no validation result to select a state from")
    best.restore(engine, wide.table)
    t0 = time.perf_counter()
    test = evaluate_split(engine.module, wide, cfg, "test", url, cluster_block=cluster_block)
    test["seconds"] = time.perf_counter() - t0
    counts = train_item_counts(url, wide.table.num_rows, rank, world)
    popularity = evaluate_split(engine.module, wide, cfg, "test", url, popularity=counts)
    log.info("test (state of step %d, selected on val %s): %s", best_step, cfg.eval.select_metric,
             " ".join(f"{k}={v:.4f}" for k, v in test.items() if k.startswith(("Recall@", "NDCG@"))))
    rss = peak_rss_gib_per_rank()
    payload = {
        "name": cfg.name, "model": f"diffrec:{dcfg.variant}", "peak_rss_gib_per_rank": rss,
        "item_table": {"rows": wide.table.num_rows, "dim": wide.layout.dim, "sharding": cfg.sparse.sharding,
                       "rows_per_rank": wide.block_width}, "dataset": cfg.data.dataset, "world_size": world,
        "device": str(device), "steps": step, "steps_per_epoch": steps_per_epoch, "epochs": step / steps_per_epoch,
        "stopped_early": stopped_early, "train_seconds": t_train, "selected_step": best_step,
        "select_metric": cfg.eval.select_metric, "best_val": best_value, "test": test, "test_std": {},
        "seconds_per_step": t_timed / max(timed_steps, 1),
        "samples_per_second": cfg.train.batch_size * world * timed_steps / max(t_timed, 1e-9),
        "test_seeds": [], "popularity_test": popularity,
        "protocol": {"input": "the user's train vector (T-DiffRec: temporal weights)",
                     "masked": "valid: train items; test: train + valid items (targets never)",
                     "full_catalog": True, "ties": cfg.eval.ties, "selection": "validation",
                     "test_evaluated_once": True, "users_without_targets": "skipped, counted"},
        "config": cfg.to_dict(), "loss_curve": report.losses, "validation": report.val,
    }
    report.save(payload)
    report.close()
    barrier()
    return payload
