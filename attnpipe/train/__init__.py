"""Training the pooling head (optionally the backbone's end) that the encoder uses; see :mod:`.trainer`."""

from attnpipe.train.trainer import train_for_demo, train_head

__all__ = ["train_for_demo", "train_head"]
