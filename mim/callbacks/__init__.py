"""Lightning callbacks. On by default in ``mim fit`` (:class:`mim.lightning_cli.MimCLI`): :class:`FaultTolerance`
(atomic checkpoints, a checkpoint on SIGTERM, resume settings), :class:`RunMetrics` (speed, MFU, health),
:class:`RunPictures` (reconstructions, masks) and :class:`RunProgressBar` (one bar over the run). Opt-in:
:class:`OnlineKNN` (k-NN accuracy of the encoder during pretraining)."""

from mim.callbacks.fault_tolerance import FaultTolerance
from mim.callbacks.online_eval import OnlineKNN
from mim.callbacks.progress import RunProgressBar
from mim.callbacks.run_metrics import RunMetrics
from mim.callbacks.run_pictures import RunPictures

__all__ = ["FaultTolerance", "OnlineKNN", "RunMetrics", "RunPictures", "RunProgressBar"]
