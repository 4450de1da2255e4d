"""Lightning callbacks: :class:`OnlineKNN` (k-NN accuracy of the encoder during pretraining)."""

from mim.callbacks.online_eval import OnlineKNN

__all__ = ["OnlineKNN"]
