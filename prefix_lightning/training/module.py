"""The LightningModule: any method (a prefix by default), trained on target tokens, scored by decoding."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any, cast

import lightning as L
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from transformers import PreTrainedTokenizerBase

from prefix_lightning.backbones import backbone_identity
from prefix_lightning.decoding import generated_texts
from prefix_lightning.evaluation import main_validation_metric, score, task_metrics, validation_suite
from prefix_lightning.methods import TrainableLM
from prefix_lightning.training.checks import require_validation_within
from prefix_lightning.training.schedule import linear_warmup_decay
from prefix_lightning.training.sharded import clip_sharded_grad_norm, trainable_by_name

log = logging.getLogger(__name__)


BASE_MODEL = "base_model"  # the checkpoint's record of its run's base model (backbone_identity)
METHOD_CLASS = "method_class"  # the checkpoint's record of the class of its run's method (PrefixModel, LoRA, ...)


# Lightning's warnings about Lightning's own ways, not about the run: silenced for every command that runs it.
# The frozen LM stays in eval mode on purpose (no LM dropout); Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# Our loaders do resume mid-epoch (data/sampler.py takes the position from the loop's state), which Lightning,
# looking for a stateful loader, cannot see: it would warn on every such resume that results may be unreliable.
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
# Lightning (up to 2.6) builds torch's LeafSpec, which newer torch deprecates: a warning at every run, about
# Lightning's code, not the user's.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)


class MethodModule(L.LightningModule):
    """Optimizes only what the method trains (the prefix, by default); validation reports the loss and BLEU (ROUGE
    for XSum), the test the dataset's metrics, both write generations.

    Checkpoints hold the trainable tensors only (plus optimizer, scheduler and loop state): the frozen part of the
    LM is rebuilt from its source, never stored.
    """

    def __init__(
        self,
        model: TrainableLM,
        tokenizer: PreTrainedTokenizerBase,
        output_dir: str,
        lr: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        generation: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "tokenizer"], logger=False)  # train() logs the config
        self.model = model
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir)
        self.generation = dict(generation or {})
        self.strict_loading = False
        self._outputs: list[dict[str, Any]] = []

    @property
    def hparams(self) -> AttributeDict:
        """The saved arguments. Lightning's type also admits a plain mapping, which has no attribute access;
        ``save_hyperparameters`` always stores an ``AttributeDict``."""
        return cast(AttributeDict, super().hparams)

    def setup(self, stage: str) -> None:
        """A method whose batches may leave part of what it trains unused (a prefix per task, and a batch without
        some task: ``leaves_parameters_unused``) has DDP look for unused parameters; DDP would wait for their
        gradients forever. Those keep no gradient, so AdamW leaves them as in one process."""
        strategy = self.trainer.strategy
        if getattr(self.model, "leaves_parameters_unused", False) and isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs["find_unused_parameters"] = True  # Lightning's kwargs for DistributedDataParallel

    def on_train_start(self) -> None:
        trainer = self.trainer
        interval, epochs = trainer.val_check_interval, trainer.max_epochs
        if not isinstance(interval, int) or trainer.check_val_every_n_epoch is not None or not epochs or epochs < 1:
            return
        require_validation_within(
            interval,
            int(trainer.num_training_batches) * epochs,
            f"{epochs} epochs of {trainer.num_training_batches}, trainer.max_epochs",
        )

    def forward(self, **batch: Any) -> Any:
        return self.model(**batch)

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.loss(**batch)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._loss(batch)
        if not torch.isfinite(loss):
            kept = getattr(self.trainer.checkpoint_callback, "dirpath", None)
            # Before the first validation or timed save there is none: the message must not send one looking for it.
            saved = kept is not None and any(Path(kept).glob("*.ckpt"))
            where = f"the last good checkpoint is kept in {kept}" if saved else "no checkpoint had been written yet"
            raise FloatingPointError(
                f"the training loss is {loss.item()} at step {self.global_step}: stopped before it could spoil the "
                f"prefix; {where}. Lower method.lr or check the data."
            )
        # Averaged over the ranks (a scalar all-reduce, no host sync): the loss whose gradient DDP averages.
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0], sync_dist=True)
        return loss

    # -- decoding ------------------------------------------------------------------------------------------
    def _generate(self, batch: dict[str, Any]) -> None:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        if "prefixes" in batch:  # a mixture of tasks: each row with its task's prefix
            inputs["prefixes"] = batch["prefixes"]
        output = self.model.generate(**inputs, **self.generation)
        texts = generated_texts(output, inputs["input_ids"].shape[1], self.model.lm, self.tokenizer)
        keys = ("group_id", "category", "source", "references")
        columns = (batch["group_ids"], batch["categories"], batch["sources"], batch["references"])
        tasks = batch.get("prefixes", [None] * len(texts))
        for *values, task, text in zip(*columns, tasks, texts, strict=True):
            row = {**dict(zip(keys, values, strict=True)), "generation": text}
            self._outputs.append(row if task is None else {"task": task, **row})

    def _score(self, split: str) -> None:
        outputs = self._gather(self._outputs)
        self._outputs = []
        if not outputs:
            return
        # Lightning sets this attribute without declaring it.
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        tasks: dict[str, Any] | None = getattr(datamodule, "tasks", None)
        if tasks is None:
            metrics = _split_metrics(split, datamodule, outputs)
        else:  # data=multi: each task with its own metrics
            by_task = {task: [o for o in outputs if o["task"] == task] for task in tasks}
            metrics = task_metrics(
                {task: _split_metrics(split, tasks[task], part) for task, part in by_task.items() if part}
            )
        suites = [getattr(data, "metric_suite", "bleu") for data in (tasks or {"": datamodule}).values()]
        main = {main_validation_metric(suite).removeprefix("val/") for suite in suites}
        for key, value in metrics.items():
            # Every rank scored the same gathered outputs: syncing averages equal values (and tells Lightning that
            # the value is the whole set's, which it otherwise warns about on several processes).
            self.log(f"{split}/{key.lower()}", value, prog_bar=key.lower() in main, sync_dist=True)
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self._write(split, outputs, metrics)

    def _gather(self, outputs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.trainer.world_size == 1:
            return outputs
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, outputs)
        by_group = {o["group_id"]: o for part in gathered for o in part}  # the sampler pads ranks with repeats
        return [by_group[key] for key in sorted(by_group)]

    def _write(self, split: str, outputs: list[dict[str, Any]], metrics: dict[str, float]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        name = outputs_name(split, self.global_step)
        # One line per input for line-based scorers: line breaks in a generation become spaces (the JSONL keeps them).
        lines = "".join(" ".join(o["generation"].splitlines()) + "\n" for o in outputs)
        (self.output_dir / f"{name}_generations.txt").write_text(lines, encoding="utf-8")
        with open(self.output_dir / f"{name}_generations.jsonl", "w", encoding="utf-8") as file:
            for output in outputs:
                file.write(json.dumps(output) + "\n")
        (self.output_dir / f"{name}_metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        scores = ", ".join(f"{key} {value:.4g}" for key, value in metrics.items())
        log.info("%s over %d inputs: %s; generations in %s", split, len(outputs), scores, self.output_dir)

    # -- validation and test -------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        if dataloader_idx == 0:
            loss = self._loss(batch)
            self.log(
                "val/loss",
                loss,
                prog_bar=True,
                sync_dist=True,
                add_dataloader_idx=False,
                batch_size=batch["input_ids"].shape[0],
            )
        else:
            self._generate(batch)

    def on_validation_epoch_end(self) -> None:
        self._score("val")

    def on_test_start(self) -> None:
        """The test logs at the steps taken, as after a straight fit. A run resumed from the checkpoint of its last
        validation (stopped in its test) has no step left to train, and Lightning counts a step for its loggers only
        after the step's validation, where that checkpoint was written: its test logged one step early, and
        metrics.csv, continued from the step an attempt logs first, dropped the earlier attempt's last training loss
        and validation."""
        epoch_loop = self.trainer.fit_loop.epoch_loop
        epoch_loop._batches_that_stepped = max(epoch_loop._batches_that_stepped, self.trainer.global_step)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._generate(batch)

    def on_test_epoch_end(self) -> None:
        self._score("test")

    # -- optimization --------------------------------------------------------------------------------------
    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        optimizer = torch.optim.AdamW(
            self.model.trainable_parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        schedule = linear_warmup_decay(
            optimizer, self.hparams.warmup_steps, lambda: self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        clip_by_norm = bool(gradient_clip_val) and gradient_clip_algorithm in (None, "norm")
        if clip_by_norm and clip_sharded_grad_norm(self.trainer.strategy, float(gradient_clip_val or 0)):
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # -- checkpoints: trainable tensors only ---------------------------------------------------------------
    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return trainable_by_name(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._trainable()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint[BASE_MODEL] = backbone_identity(self.model.lm)
        checkpoint[METHOD_CLASS] = type(self.model).__name__

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Non-strict loading (the LM is not in the file) would silently skip prefix tensors: check them here, and
        the base model's type, which prefixes of the same shapes would not show (as an export's load checks it).

        DeepSpeed (its own checkpoint folders) and FSDP (which loads the tensors before this hook) leave no
        ``state_dict`` here: they restore the module themselves.
        """
        trained_for = checkpoint.get(BASE_MODEL, {}).get("model_type")  # absent from older checkpoints
        own = self.model.lm.config.model_type
        if trained_for is not None and trained_for != own:
            raise ValueError(
                f"this checkpoint was written by a run on a {trained_for} model, but this run's base model is a "
                f"{own} model: start from a checkpoint of a run on the same base model"
            )
        written_by, trains = checkpoint.get(METHOD_CLASS), type(self.model).__name__  # absent from older checkpoints
        if written_by is not None and written_by != trains:
            raise ValueError(
                f"this checkpoint was written by a run of the method {written_by}, but this run's method is {trains}: "
                "start from a checkpoint of a run of the same method"
            )
        if "state_dict" not in checkpoint:
            return
        expected = {name: tuple(p.shape) for name, p in self._trainable().items()}
        found = {name: tuple(t.shape) for name, t in checkpoint["state_dict"].items()}
        if found != expected:
            differing = sorted(k for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
            raise ValueError(
                "this checkpoint does not fit the configured prefix: "
                + "; ".join(f"{k}: checkpoint {found.get(k)}, run {expected.get(k)}" for k in differing[:3])
                + ". Was it written by a run with another prefix length, reparametrization or base model?"
            )
        if list(found) != list(expected):  # the optimizer's state is restored by position, not by name
            first = next(i for i, (a, b) in enumerate(zip(found, expected, strict=True)) if a != b)
            raise ValueError(
                f"this checkpoint holds the same tensors in another order (its tensor {first} is {list(found)[first]}, "
                f"this run's {list(expected)[first]}): the optimizer's state would go to other tensors. Was it "
                "written by a run with the tasks in another order (data.tasks)? Give that order"
            )


def outputs_name(split: str, step: int) -> str:
    """The stem of a split's output files (``<stem>_generations.jsonl``, ...): ``test``, or ``val_step<N>`` for the
    validation after N training steps."""
    return split if split == "test" else f"{split}_step{step}"


def _split_metrics(split: str, datamodule: Any, outputs: list[dict[str, Any]]) -> dict[str, float]:
    """Validation scores what picks the best checkpoint (see validation_suite: BLEU, XSum's ROUGE); the test runs
    the dataset's full suite, and for WebNLG also on the test inputs of categories seen / unseen in training."""
    suite = getattr(datamodule, "metric_suite", "bleu")
    metrics = _score_outputs(suite if split == "test" else validation_suite(suite), outputs)
    seen: frozenset[str] = getattr(datamodule, "seen_categories", frozenset()) if split == "test" else frozenset()
    for subset, is_seen in (("seen", True), ("unseen", False)) if seen else ():
        part = [o for o in outputs if (o["category"] in seen) == is_seen]
        if part:
            metrics |= {f"{subset}/{key}": value for key, value in _score_outputs(suite, part).items()}
    return metrics


def _score_outputs(suite: str, outputs: list[dict[str, Any]]) -> dict[str, float]:
    return score(suite, [o["generation"] for o in outputs], [o["references"] for o in outputs])
