"""divebatch: cheap per-sample gradient norms and gradient-diversity-adaptive batch sizes.

``GradNormTracker`` yields each sample's squared gradient norm and the batch gradient's
squared norm from an ordinary backward pass (ghost norms; C++ on CPU, Triton on CUDA);
the estimators, policies and sampler turn them into DiveBatch batch-size schedules, and
``train`` / the ``divebatch`` command run the whole method.
"""

from . import ops
from .estimator import EpochDiversity, NoiseScale
from .sampler import AdaptiveBatchSampler
from .schedule import DEFAULT_POLICY, PAPER_POLICY, AdaBatch, CosineLR, DiveBatch, Fixed
from .tracker import GradNormStats, GradNormTracker
from .train import TrainConfig, Trainer, train

__all__ = ["GradNormTracker", "GradNormStats", "ops", "EpochDiversity", "NoiseScale", "DiveBatch", "AdaBatch",
           "Fixed", "CosineLR", "DEFAULT_POLICY", "PAPER_POLICY", "AdaptiveBatchSampler", "train", "Trainer",
           "TrainConfig"]
__version__ = "0.1.0"
