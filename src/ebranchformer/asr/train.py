"""Train a CTC recognizer: ``train(config)``, or ``python -m ebranchformer.asr.train CONFIG.yaml``.

One code path for a single process and for ``torchrun --nproc_per_node N [--nnodes M ...]``:
DistributedDataParallel over gloo (CPU) or nccl (GPU), on ``cuda:LOCAL_RANK`` when CUDA is present. Batches
come from :class:`~ebranchformer.asr.batching.DistributedBucketBatchSampler` in ``"split_batches"`` mode:
every rank takes an equal slice of each global batch, and DDP's gradient mean of the slices' batch-mean losses
is the global batch's gradient. So N processes train as one process on the same global batches, up to float
rounding; two caveats: global batches are packed in groups of N utterances (a single process packs in groups
of 1, which can cut batches differently), and ESPnet's centred STFT (``features.center``) makes the last
frames of the longest row of each slice see its own reflected end rather than zeros (about 1e-3). Rank 0 alone
writes the tokenizer, statistics, checkpoints, logs and the final model, and runs validation while the
others wait.

A run, in ``output_dir``:

1. ``config.yaml`` (the resolved TrainConfig), ``tokenizer/`` (built from the training transcripts unless
   given), ``feats_stats.npz`` (feature statistics for global MVN, ESPnet's layout); both reused by a later run
   in the same ``output_dir`` only if built from the same settings (:mod:`~ebranchformer.asr.provenance`);
2. training steps: each step runs ``optim.accum_grad`` batches (forward/backward under autocast for bf16/fp16,
   gradients summed, DDP syncing on the last), clips the gradient norm, and updates -- unless the gradient is
   non-finite, then the update is **skipped and counted** (the scheduler does not advance; with fp16 the
   GradScaler lowers its scale). A batch whose items were all bad (the data layer skips and counts them) is
   dropped; under DDP every rank drops that batch together;
3. every ``checkpoint.every_steps`` steps and at the end: validation (loss, greedy WER/CER with jiwer) and a
   checkpoint ``checkpoints/step_<n>/`` (weights, optimizer/scheduler/scaler/RNG/sampler state; atomic);
   the newest ``keep_last`` and the ``average_best`` best are kept;
4. ``metrics.jsonl`` (a train record every ``log.every_steps`` steps, a valid record per checkpoint) and
   ``learning_curves.png``; a tqdm bar with loss, lr and frames/s;
5. at the end, the ``average_best`` best checkpoints (by ``checkpoint.average_by``) averaged into the model
   directory ``model/`` (:mod:`ebranchformer.asr.model_dir`), validated once more.

Every rank reads ``output_dir`` (tokenizer, statistics, checkpoints), so with ``--nnodes`` > 1 it must be on
a shared file system.

Resuming (``checkpoint.resume``, default on) continues from the newest complete checkpoint: weights,
optimizer, scheduler, scaler, every rank's RNG states, the epoch and position in it, the counters. With
``deterministic: true`` the losses after a resume equal those of the uninterrupted run exactly.

Example:
    >>> from ebranchformer.asr.train import train
    >>> from ebranchformer.asr.train_config import load_train_config
    >>> result = train(load_train_config("conf/train.yaml"))  # doctest: +SKIP
    >>> result.model_dir, result.final_valid["wer"]  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ebranchformer.asr.atomic import atomic_write, remove_stale_temps
from ebranchformer.asr.batching import BucketBatchSampler, DistributedBucketBatchSampler
from ebranchformer.asr.checkpoint import (
    average_checkpoints,
    capture_rng_state,
    checkpoint_step,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_meta,
    remove_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from ebranchformer.asr.ctc_model import CTCModel
from ebranchformer.asr.data import AudioDataset
from ebranchformer.asr.distributed import DistContext, setup_distributed
from ebranchformer.asr.evaluate import evaluate
from ebranchformer.asr.global_mvn import GlobalMVN
from ebranchformer.asr.manifest import read_jsonl_manifest
from ebranchformer.asr.metrics_log import MetricsLog, plot_learning_curves
from ebranchformer.asr.provenance import check_source, record_source
from ebranchformer.asr.schedulers import LRSchedule, build_scheduler
from ebranchformer.asr.skip_report import SkipReport
from ebranchformer.asr.tokenizer import load_tokenizer
from ebranchformer.asr.train_config import TrainConfig, load_train_config
from ebranchformer.asr.train_data import (
    MinLengthCollate,
    build_tokenizer,
    compute_feature_stats,
    frames_of,
    make_loader,
    save_stats_atomic,
)

__all__ = ["TrainResult", "Trainer", "main", "train"]

logger = logging.getLogger(__name__)

_STATE_VERSION = 1
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; the file paths are written by rank 0).

    Attributes:
        output_dir: the run folder.
        model_dir: the final (averaged) model directory.
        step: steps done in total (including those before a resume).
        updates: optimizer updates done in total (steps minus skipped ones).
        epoch: the epoch the run stopped in (0-based).
        skipped_steps: steps whose gradient was non-finite (no update).
        skipped_batches: batches dropped because all their items were bad (or a peer rank's were).
        data_skips: bad manifest lines and bad training items (all ranks; items counted in the first epoch,
            which meets each of them once).
        losses: the train loss (mean over ranks and accumulated batches) of each step this call ran.
        valid: the validation results of this call, ``{"step", "loss", "wer", "cer", ...}`` each.
        final_valid: validation of the final model (None without a validation set).
        averaged_steps: the steps of the checkpoints averaged into the final model.
        resumed_from: the checkpoint step this call resumed from, or None.
    """

    output_dir: Path
    model_dir: Path
    step: int
    updates: int
    epoch: int
    skipped_steps: int
    skipped_batches: int
    data_skips: SkipReport
    losses: dict[int, float]
    valid: list[dict[str, float]]
    final_valid: dict[str, float] | None
    averaged_steps: list[int]
    resumed_from: int | None


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def _determinism(enabled: bool) -> Iterator[None]:
    """Deterministic kernels while training (restored afterwards: the switches are process-global)."""
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(
            True, warn_only=True
        )  # CTC's CUDA backward has no deterministic kernel
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


class Trainer:
    """One training run (see the module doc); :meth:`run` trains and returns a :class:`TrainResult`.

    Args:
        config: the :class:`TrainConfig`.
        ctx: the process's :class:`DistContext` (default: :func:`setup_distributed` with ``config.device``).

    Attributes worth a look in tests and tools: ``model`` (the unwrapped :class:`CTCModel`), ``optimizer``,
    ``scheduler``, ``step``, ``updates``, ``skipped_steps``.
    """

    def __init__(self, config: TrainConfig, ctx: DistContext | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        self.cfg = config
        self.ctx = ctx if ctx is not None else setup_distributed(config.device)
        self.out = Path(config.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.metrics = MetricsLog(self.out / "metrics.jsonl")
        _seed_everything(config.seed + self.ctx.rank)
        self._prepare_output_dir()
        self.step = self.updates = self.epoch = self.position = 0
        self.skipped_steps = self.skipped_batches = 0
        self.resumed_from: int | None = None
        self.train_utts, manifest_skips = read_jsonl_manifest(config.data.train, config.data.check_audio)
        if not self.train_utts:
            raise ValueError(
                f"data.train {config.data.train!r} holds no usable utterances ({manifest_skips})"
            )
        self.data_skips = manifest_skips if self.ctx.is_main else SkipReport()  # counted once, on rank 0
        self.valid_utts = []
        if config.data.valid is not None:
            self.valid_utts, valid_skips = read_jsonl_manifest(config.data.valid, config.data.check_audio)
            if valid_skips and self.ctx.is_main:
                logger.warning("valid manifest: %s", valid_skips)
        self.tokenizer = self._tokenizer()
        if config.model.vocab_size not in (None, self.tokenizer.vocab_size):
            raise ValueError(
                f"model.vocab_size={config.model.vocab_size} but the tokenizer has "
                f"{self.tokenizer.vocab_size} tokens; leave model.vocab_size out (it comes from the tokenizer)"
            )
        model_cfg = config.model.replace(vocab_size=self.tokenizer.vocab_size)
        self.model = CTCModel(model_cfg, tokenizer=self.tokenizer)
        if model_cfg.normalize is not None:
            self.model.set_normalizer(self._feature_stats())
        self.model.to(self.ctx.device)
        self._build_data()
        self._build_optimizer()

    # -- setup -----------------------------------------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.ckpt_dir.mkdir(exist_ok=True)
            remove_stale_temps(self.ckpt_dir)
            remove_stale_temps(self.out)
            if list_checkpoints(self.ckpt_dir) and not self.cfg.checkpoint.resume:
                raise ValueError(
                    f"output_dir {str(self.out)!r} already holds checkpoints; set checkpoint.resume: true "
                    "to continue that run, or choose another output_dir"
                )
            atomic_write(self.out / "config.yaml", self.cfg.to_yaml())
        self.ctx.barrier()

    def _tokenizer(self):
        directory = self.out / "tokenizer"
        record = directory / "source.json"
        source = {"tokenizer": self.cfg.tokenizer.to_dict(), "train": self.cfg.data.train}
        if self.ctx.is_main and not (directory / "tokenizer.json").is_file():
            build_tokenizer(self.cfg.tokenizer, [u.text for u in self.train_utts], directory)
            record_source(record, source)
        self.ctx.barrier()
        # on every rank, so that all of them stop; a moved training manifest only warns
        check_source(record, source, "tokenizer", directory, warn_only=("train",))
        return load_tokenizer(directory)

    def _feature_stats(self) -> GlobalMVN:
        path = self.out / "feats_stats.npz"
        record = self.out / "feats_stats.json"
        features = self.model.config.features
        source = {"features": None if features is None else features.to_dict(), "train": self.cfg.data.train}
        if self.ctx.is_main and not path.is_file():
            logger.info("computing feature statistics over %d training utterances", len(self.train_utts))
            mvn = compute_feature_stats(
                self.train_utts,
                self.model.frontend,
                sample_rate=self.cfg.data.sample_rate,
                max_frames=self.cfg.data.max_frames,
                num_workers=self.cfg.data.num_workers,
                device=self.ctx.device,
            )
            save_stats_atomic(mvn, path)
            record_source(record, source)
        self.ctx.barrier()
        check_source(record, source, "feature statistics", path, warn_only=("train",))
        return GlobalMVN.from_espnet_stats(path)

    def _build_data(self) -> None:
        d = self.cfg.data
        hop = self.model.config.features.hop_length
        min_samples = self.model.min_num_samples()
        self.train_set = AudioDataset(self.train_utts, tokenizer=self.tokenizer, sample_rate=d.sample_rate)
        self.train_collate = MinLengthCollate(self.train_set, min_samples)
        self.sampler = DistributedBucketBatchSampler(
            frames_of(self.train_set.durations, d.sample_rate, hop),
            d.max_frames,
            num_buckets=d.num_buckets,
            shuffle=True,
            seed=self.cfg.seed,
            max_batch_size=d.max_batch_size,
            num_replicas=self.ctx.world_size,
            rank=self.ctx.rank,
            shard="split_batches",
        )
        self.valid_set = self.valid_batches = None
        if self.valid_utts and self.ctx.is_main:
            self.valid_set = AudioDataset(
                self.valid_utts, tokenizer=self.tokenizer, sample_rate=d.sample_rate
            )
            self.valid_collate = MinLengthCollate(self.valid_set, min_samples)
            lengths = frames_of(self.valid_set.durations, d.sample_rate, hop)
            self.valid_batches = BucketBatchSampler(lengths, d.max_frames, shuffle=False).batches(0)

    def _build_optimizer(self) -> None:
        o = self.cfg.optim
        cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.optimizer = cls(
            self.model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )
        self.max_steps = o.total_steps  # the stop condition besides max_epochs
        self.total_steps = self._total_steps()  # for the cosine schedule and the progress bar
        total = self.total_steps if o.scheduler == "warmup_cosine" else None
        schedule = LRSchedule(o.scheduler, o.warmup_steps, total, o.min_lr_ratio)
        self.scheduler = build_scheduler(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.cfg.precision == "fp16")
        self.autocast_dtype = _AUTOCAST[self.cfg.precision]

    def _total_steps(self) -> int | None:
        """optim.total_steps, or the steps of max_epochs epochs if fewer (estimated: epoch 0's batch count per
        epoch)."""
        o = self.cfg.optim
        if o.max_epochs is None:
            return o.total_steps
        per_epoch = len(self.sampler.rank_batches(epoch=0)) // o.accum_grad
        by_epochs = max(1, per_epoch * o.max_epochs)
        return by_epochs if o.total_steps is None else min(o.total_steps, by_epochs)

    # -- resume ----------------------------------------------------------------------------------------------
    def _train_state(self, rng_states: list[Any], skips: SkipReport) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "updates": self.updates,
            "epoch": self.epoch,
            "position": self.position,
            "skipped_steps": self.skipped_steps,
            "skipped_batches": self.skipped_batches,
            "world_size": self.ctx.world_size,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_states,
            "data_skips": {
                "counts": dict(skips.counts),
                "examples": {k: list(v) for k, v in skips.examples.items()},
            },
        }

    def resume(self) -> int | None:
        """Load the newest complete checkpoint in ``output_dir/checkpoints`` (if any); returns its step."""
        path = latest_checkpoint(self.ckpt_dir) if self.cfg.checkpoint.resume else None
        path = self.ctx.broadcast_object(str(path) if path is not None else None)
        if path is None:
            return None
        weights, state, _ = load_checkpoint(path, device="cpu")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(
                f"checkpoint {path!r}: unsupported training state version {state.get('version')!r}"
            )
        self.model.load_state_dict(weights, strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for name in ("step", "updates", "epoch", "position", "skipped_steps", "skipped_batches"):
            setattr(self, name, int(state[name]))
        if self.ctx.is_main:
            restored = SkipReport()
            restored.counts.update(state["data_skips"]["counts"])
            restored.examples.update({k: list(v) for k, v in state["data_skips"]["examples"].items()})
            self.data_skips = restored  # the manifest skips are in it already
            self.metrics.truncate_after(self.step)
        else:
            self.data_skips = SkipReport()
        rng = state["rng"]
        if len(rng) == self.ctx.world_size:
            restore_rng_state(rng[self.ctx.rank])
        else:
            logger.warning(
                "checkpoint was written by %d processes, this run has %d: RNG states are reseeded",
                len(rng),
                self.ctx.world_size,
            )
            _seed_everything(self.cfg.seed + self.ctx.rank + 1000 * self.step)
        self.resumed_from = self.step
        return self.step

    # -- the loop --------------------------------------------------------------------------------------------
    def _epoch_stream(self) -> Iterator[dict[str, Any] | None]:
        """Batches from (epoch, position) onwards, epoch after epoch; advances the position as it yields."""
        max_epochs = self.cfg.optim.max_epochs
        while max_epochs is None or self.epoch < max_epochs:
            batches = self.sampler.rank_batches(epoch=self.epoch)[self.position :]
            loader = make_loader(
                self.train_set,
                batches,
                self.train_collate,
                self.cfg.data.num_workers,
                pin_memory=self.ctx.device.type == "cuda",
            )
            for batch in loader:
                self.position += 1
                yield batch
            self.epoch += 1
            self.position = 0

    def _next_batch(self, stream: Iterator[dict[str, Any] | None]) -> dict[str, Any] | None:
        """The next batch every rank has data for; None when the data has run out (max_epochs)."""
        while True:
            batch = next(stream, StopIteration)
            if batch is StopIteration:
                return None
            if batch is not None:
                skips = batch.pop("skips")
                if self.epoch == 0:  # every epoch meets the same bad items: count them once
                    self.data_skips = self.data_skips.merge(skips)
            if self.ctx.all_min(int(batch is not None)) == 1:
                return batch
            self.skipped_batches += 1

    def _forward_backward(
        self, batch: dict[str, Any], model: torch.nn.Module, sync: bool
    ) -> dict[str, float]:
        dev = self.ctx.device
        no_sync = model.no_sync() if (self.ctx.distributed and not sync) else contextlib.nullcontext()
        amp = (
            torch.autocast(dev.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with no_sync:
            with amp:
                loss, stats = model(
                    batch["wav"].to(dev, non_blocking=True),
                    batch["wav_lengths"].to(dev),
                    batch["tokens"].to(dev),
                    batch["token_lengths"].to(dev),
                )
            self.scaler.scale(loss / self.cfg.optim.accum_grad).backward()
        return stats

    def train_step(
        self, stream: Iterator[dict[str, Any] | None], model: torch.nn.Module
    ) -> dict[str, float] | None:
        """One step: ``accum_grad`` batches, then an update unless the gradient is non-finite.

        Returns the step's stats (losses averaged over batches and ranks, ``lr``, ``grad_norm``,
        ``feat_frames`` summed over ranks, ``skipped``), or None when the data ran out (a partial step is
        dropped).
        """
        o = self.cfg.optim
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, float] = {}
        for k in range(o.accum_grad):
            batch = self._next_batch(stream)
            if batch is None:
                self.optimizer.zero_grad(set_to_none=True)
                return None
            for key, v in self._forward_backward(batch, model, sync=k == o.accum_grad - 1).items():
                sums[key] = sums.get(key, 0.0) + v
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = o.grad_clip if o.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        finite = math.isfinite(grad_norm)
        if finite:
            self.scaler.step(self.optimizer)
            self.scheduler.step()
            self.updates += 1
        else:
            self.skipped_steps += 1
            self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        self.step += 1
        keys = sorted(k for k in sums if k.startswith("loss"))
        means = self.ctx.all_mean([sums[k] / o.accum_grad for k in keys] + [sums["feat_frames"]])
        stats = dict(zip(keys, means[:-1]))
        stats.update(
            lr=lr, grad_norm=grad_norm, feat_frames=means[-1] * self.ctx.world_size, skipped=float(not finite)
        )
        return stats

    def run(self) -> TrainResult:
        """Resume if possible, train to the end, average, write the model directory; see the module doc."""
        self.resume()
        model: torch.nn.Module = self.model
        if self.ctx.distributed:
            dev = self.ctx.device
            model = torch.nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                find_unused_parameters=self.model.config.encoder["layer_drop"] > 0,
            )
        losses: dict[int, float] = {}
        valid: list[dict[str, float]] = []
        stream = self._epoch_stream()
        every = self.cfg.checkpoint.every_steps
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=not (self.ctx.is_main and self.cfg.log.progress_bar),
        )
        window: list[dict[str, float]] = []
        last_saved = self.resumed_from
        try:
            while self.max_steps is None or self.step < self.max_steps:
                t0 = time.perf_counter()
                stats = self.train_step(stream, model)
                if stats is None:
                    break
                stats["frames_per_s"] = stats["feat_frames"] / max(time.perf_counter() - t0, 1e-9)
                losses[self.step] = stats["loss"]
                window.append(stats)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{stats['loss']:.3f}", lr=f"{stats['lr']:.2e}", fps=f"{stats['frames_per_s']:.0f}"
                )
                if self.step % self.cfg.log.every_steps == 0:
                    self._log_train(window)
                    window = []
                if self.step % every == 0:
                    valid.extend(self._checkpoint())
                    last_saved = self.step
        finally:
            bar.close()
        if window:
            self._log_train(window)
        if last_saved != self.step:
            valid.extend(self._checkpoint())
        model_dir, final_valid, averaged = self._finish()
        skips = self.ctx.gather_objects(self.data_skips)
        total_skips = skips[0].merge(*skips[1:])
        if self.ctx.is_main and total_skips:
            logger.warning("training data: %s", total_skips)
        return TrainResult(
            output_dir=self.out,
            model_dir=model_dir,
            step=self.step,
            updates=self.updates,
            epoch=self.epoch,
            skipped_steps=self.skipped_steps,
            skipped_batches=self.skipped_batches,
            data_skips=total_skips,
            losses=losses,
            valid=valid,
            final_valid=final_valid,
            averaged_steps=averaged,
            resumed_from=self.resumed_from,
        )

    # -- reporting, checkpoints, the final model -------------------------------------------------------------
    def _log_train(self, window: list[dict[str, float]]) -> None:
        if not self.ctx.is_main:
            return
        keys = [k for k in window[-1] if k.startswith("loss") or k in ("grad_norm", "frames_per_s")]
        rec: dict[str, Any] = {"kind": "train", "step": self.step, "epoch": self.epoch}
        for k in keys:
            vals = [w[k] for w in window if k in w and math.isfinite(w[k])]
            rec[k] = sum(vals) / len(vals) if vals else float("nan")
        rec["lr"] = window[-1]["lr"]
        rec["skipped_steps"] = self.skipped_steps
        self.metrics.append(rec)

    def _validate(self, model: CTCModel) -> dict[str, float] | None:
        if self.valid_set is None:
            return None
        loader = make_loader(
            self.valid_set, self.valid_batches, self.valid_collate, self.cfg.data.num_workers
        )
        return evaluate(model, loader, autocast_dtype=self.autocast_dtype)

    def _checkpoint(self) -> list[dict[str, float]]:
        """Validate (rank 0), save a checkpoint, prune, log and plot. Collective: every rank calls it."""
        rng = self.ctx.gather_objects(capture_rng_state())
        skips = self.ctx.gather_objects(self.data_skips)
        out: list[dict[str, float]] = []
        if self.ctx.is_main:
            result = self._validate(self.model)
            meta = {"step": self.step, "epoch": self.epoch, "valid": result}
            state = self._train_state(rng, skips[0].merge(*skips[1:]))
            save_checkpoint(self.ckpt_dir, self.step, self.model.state_dict(), state, meta)
            self._prune()
            if result is not None:
                self.metrics.append({"kind": "valid", "step": self.step, "epoch": self.epoch, **result})
                out.append({"step": self.step, **result})
            if self.cfg.log.plot:
                plot_learning_curves(self.metrics.records(), self.out / "learning_curves.png")
        self.ctx.barrier()
        return out

    def _ranked(self) -> list[Path]:
        """Checkpoints best first by checkpoint.average_by (newest first when unvalidated)."""
        key = {"valid_loss": "loss", "wer": "wer", "cer": "cer"}[self.cfg.checkpoint.average_by]

        def score(p: Path) -> tuple[float, int]:
            valid = read_meta(p).get("valid") or {}
            v = valid.get(key)
            return (v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf, -checkpoint_step(p))

        return sorted(list_checkpoints(self.ckpt_dir), key=score)

    def _prune(self) -> None:
        found = list_checkpoints(self.ckpt_dir)
        keep = set(found[-self.cfg.checkpoint.keep_last :]) | set(
            self._ranked()[: self.cfg.checkpoint.average_best]
        )
        remove_checkpoints([p for p in found if p not in keep])

    def _finish(self) -> tuple[Path, dict[str, float] | None, list[int]]:
        """Average the best checkpoints into ``output_dir/model`` (rank 0) and validate it."""
        model_dir = self.out / "model"
        final_valid, averaged = None, []
        if self.ctx.is_main:
            n = self.cfg.checkpoint.average_best
            chosen = self._ranked()[:n] if n > 0 else []
            final = CTCModel(
                self.model.config, tokenizer=self.tokenizer
            )  # weights incl. statistics loaded next
            state = average_checkpoints(chosen) if chosen else self.model.state_dict()
            final.load_state_dict(state, strict=True)
            final.to(self.ctx.device)
            averaged = sorted(checkpoint_step(p) for p in chosen)
            final_valid = self._validate(final)
            final.save(model_dir)
            self.metrics.append(
                {"kind": "final", "step": self.step, "averaged": averaged, **(final_valid or {})}
            )
            if self.cfg.log.plot:
                plot_learning_curves(self.metrics.records(), self.out / "learning_curves.png")
            logger.info("final model: %s (averaged steps %s), valid %s", model_dir, averaged, final_valid)
        self.ctx.barrier()
        return model_dir, final_valid, averaged


def train(config: TrainConfig | str | os.PathLike) -> TrainResult:
    """Run training for ``config`` (a :class:`TrainConfig` or a YAML path) in this process (module doc).

    Under torchrun, every process calls this; the process group is created (and destroyed) here unless the
    caller created it.
    """
    if not isinstance(config, TrainConfig):
        config = load_train_config(config)
    ctx = setup_distributed(config.device)
    try:
        with _determinism(config.deterministic):
            return Trainer(config, ctx).run()
    finally:
        ctx.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ebranchformer.asr.train CONFIG.yaml [--set key.sub=value ...]`` (also under torchrun)."""
    parser = argparse.ArgumentParser(
        prog="python -m ebranchformer.asr.train", description=__doc__.splitlines()[0]
    )
    parser.add_argument("config", help="training config YAML (see ebranchformer.asr.train_config)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set optim.lr=0.001 (VALUE is parsed as YAML)",
    )
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    config = load_train_config(args.config, overrides=args.set)
    result = train(config)
    if rank == 0:
        print(
            f"done: {result.step} steps ({result.updates} updates, "
            f"{result.skipped_steps} skipped non-finite), "
            f"model in {result.model_dir}; {result.data_skips}; final valid {result.final_valid}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
