"""What every method shares: the interface the training layer uses, and the target-token loss."""

from prefix_lightning.methods.loss import IGNORE_INDEX, slices_logits, target_loss
from prefix_lightning.methods.protocol import TrainableLM

__all__ = ["IGNORE_INDEX", "TrainableLM", "slices_logits", "target_loss"]
