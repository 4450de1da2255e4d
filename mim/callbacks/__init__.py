"""Lightning callbacks: :class:`OnlineKNN` (k-NN accuracy of the encoder during pretraining) and
:class:`FaultTolerance` (atomic checkpoints, a checkpoint on SIGTERM, resume settings; on by default in ``mim fit``)."""

from mim.callbacks.fault_tolerance import FaultTolerance
from mim.callbacks.online_eval import OnlineKNN
from mim.callbacks.run_metrics import RunMetrics
from mim.callbacks.run_pictures import RunPictures

__all__ = ["FaultTolerance", "OnlineKNN", "RunMetrics", "RunPictures"]
