"""divebatch: cheap per-sample gradient norms and gradient-diversity-adaptive batch sizes.

``GradNormTracker`` yields each sample's squared gradient norm and the batch gradient's
squared norm from an ordinary backward pass (ghost norms; C++ on CPU, Triton on CUDA);
the training pieces turn them into DiveBatch batch-size schedules.
"""

from . import ops
from .tracker import GradNormStats, GradNormTracker

__all__ = ["GradNormTracker", "GradNormStats", "ops"]
__version__ = "0.1.0"
