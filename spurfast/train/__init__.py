"""Training: the ERM baseline and its checkpoints (the papers' training framework joins here)."""
from spurfast.train.checkpoints import checkpoint_path, latest_checkpoint, load_checkpoint, save_checkpoint
from spurfast.train.erm import epoch_seed, erm, make_optimizer

__all__ = ["erm", "make_optimizer", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_path", "epoch_seed"]
