"""hivemind.optim: collaborative training over the DHT (progress tracking, averaging of gradients and state)."""

from hivemind.optim.grad_averager import GradientAverager
from hivemind.optim.grad_scaler import GradScaler
from hivemind.optim.optimizer import Optimizer
from hivemind.optim.power_sgd_averager import PowerSGDGradientAverager
from hivemind.optim.progress_tracker import ProgressTracker
from hivemind.optim.state_averager import TrainingStateAverager
from hivemind.optim.training_averager import TrainingAverager

__all__ = [
    "Optimizer",
    "GradScaler",
    "TrainingAverager",
    "GradientAverager",
    "PowerSGDGradientAverager",
    "TrainingStateAverager",
    "ProgressTracker",
]
