"""What sharded strategies (FSDP, DeepSpeed ZeRO-3) need for a mostly frozen LM: its trainable tensors gathered
whole for an export and a checkpoint, and gradient clipping by the norm over every rank's shard."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, Strategy

from prefix_lightning.prefix.sites import unwrapped_name


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
    # One process: FSDP falls back to NO_SHARD, whose tensors are whole on the GPU already and cannot be offloaded;
    # on CPUs there is nowhere to offload to (and offloading there breaks the gathered tensors).
    sharded = root.sharding_strategy != ShardingStrategy.NO_SHARD
    offload = sharded and root.compute_device != torch.device("cpu")
    with FullyShardedDataParallel.summon_full_params(
        root, recurse=not _trainable_in_root_only(root), writeback=False, rank0_only=True, offload_to_cpu=offload
    ):
        yield


class FrozenLMFSDPStrategy(FSDPStrategy):
    """Lightning's FSDP, whose full checkpoints gather only the trainable tensors onto rank 0.

    Lightning's full state dict gathers the whole model onto rank 0 at every save, frozen LM included, only for
    ``MethodModule.on_save_checkpoint`` to keep the trainable tensors: for a prefix, gigabytes moved per checkpoint
    to keep a few megabytes. Here only what :func:`fsdp_gathered` gathers (for a prefix, the root unit) is. Lightning
    refuses its own FSDP class on CPUs but not a subclass: with ``trainer.accelerator=cpu`` this one runs on gloo,
    which is how the tests run it on several processes.
    """

    _root: torch.nn.Module | None = None  # the FSDP root that wrapped the LightningModule for the fit

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if self._root is not None and self._root.module is model:
            # The test after the fit: Lightning would wrap the module in a second root, which takes the first
            # root's shards (flat, outside its forward) for whole parameters.
            return self._root
        if self.root_device.type == "cpu":
            # Lightning gives FSDP no device on CPUs, and FSDP then looks for an accelerator: wrap with it here.
            model = FullyShardedDataParallel(
                model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=self.root_device,
                **self.kwargs,
            )
            self.kwargs.pop("auto_wrap_policy", None)  # applied: Lightning would warn that the model is wrapped
        self._root = super()._setup_model(model)
        return self._root

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if self._state_dict_type != "full":
            return super().lightning_module_state_dict()
        with fsdp_gathered(self.model):
            if self.global_rank != 0:  # as Lightning's full state dict: rank 0 writes the checkpoint
                return {}
            assert self.lightning_module is not None
            trainable = trainable_by_name(self.lightning_module)
            return {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}  # as Lightning's: on CPU

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.root_device.type != "cpu" or self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            OptimStateKeyType,
            StateDictType,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        # Lightning's, without its offload to the CPU: on CPUs FSDP's offload hands back the gather's buffer, which
        # the next tensor's gather overwrites (AdamW's exp_avg came back equal to its exp_avg_sq).
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer's own
        root = self.model
        assert root is not None
        whole = FullStateDictConfig(rank0_only=True), FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(root, StateDictType.FULL_STATE_DICT, *whole):
            state = FSDP.optim_state_dict(root, optimizer)
        if self.global_rank == 0:  # keyed by parameter index, as Lightning's checkpoints are
            state = FSDP.rekey_optim_state_dict(state, OptimStateKeyType.PARAM_ID, root)
        return state


def trainable_by_name(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable parameters by the names a state dict gives them (FSDP's wrappers' segments left out)."""
    return {unwrapped_name(name): p for name, p in module.named_parameters() if p.requires_grad}


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
    with warnings.catch_warnings():
        # A prefix is a few tensors of the root unit: a rank whose shard holds none of them has no gradient, and its
        # share of the norm is rightly 0.
        warnings.filterwarnings("ignore", message=r"Called FSDP.clip_grad_norm_\(\) on rank \d+ with no gradients")
        strategy.model.clip_grad_norm_(max_norm)
    return True
