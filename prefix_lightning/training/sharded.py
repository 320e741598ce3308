"""What sharded strategies (FSDP, DeepSpeed ZeRO-3) need for a mostly frozen LM: its trainable tensors gathered
whole for an export, and gradient clipping by the norm over every rank's shard."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy


@contextmanager
def trainable_whole_on_rank_zero(trainer: L.Trainer, pl_module: L.LightningModule) -> Iterator[None]:
    """The trainable parameters whole on global rank 0 inside the block, where the strategy shards them outside its
    steps. Every rank must enter it (it gathers from all of them).

    FSDP: where every trainable tensor belongs to the root unit (a prefix: the decoder layers are units of their
    own, see conf/trainer/fsdp.yaml), only the root unit is gathered (the prefix with the embeddings and the final
    norm), never the decoder layers; methods that train inside the layers (LoRA, full, top layers) gather it all.
    """
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        with fsdp_gathered(strategy.model):
            yield
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in pl_module.parameters() if p.requires_grad]):
            yield
    else:
        yield


@contextmanager
def fsdp_gathered(root: torch.nn.Module | None) -> Iterator[None]:
    """FSDP's trainable tensors whole on rank 0 (on its CPU where they are sharded) inside the block; see
    :func:`trainable_whole_on_rank_zero`."""
    from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy

    assert isinstance(root, FullyShardedDataParallel)  # wrapped before training starts
    # One process: FSDP falls back to NO_SHARD, whose tensors are whole on the GPU already and cannot be offloaded.
    sharded = root.sharding_strategy != ShardingStrategy.NO_SHARD
    with FullyShardedDataParallel.summon_full_params(
        root, recurse=not _trainable_in_root_only(root), writeback=False, rank0_only=True, offload_to_cpu=sharded
    ):
        yield


def _trainable_in_root_only(root: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    nested = {
        id(p) for unit in FullyShardedDataParallel.fsdp_modules(root) if unit is not root for p in unit.parameters()
    }
    return not any(p.requires_grad and id(p) in nested for p in root.parameters())


def clip_sharded_grad_norm(strategy: Strategy, max_norm: float) -> bool:
    """Clip by the norm over every rank's shard where the strategy shards gradients (FSDP: its root unit's
    ``clip_grad_norm_``; Lightning's FSDP precision refuses to). False where the usual clipping applies."""
    if not isinstance(strategy, FSDPStrategy):
        return False
    from torch.distributed.fsdp import FullyShardedDataParallel

    assert isinstance(strategy.model, FullyShardedDataParallel)
    strategy.model.clip_grad_norm_(max_norm)
    return True
