"""hivemind.optim: collaborative training over the DHT (progress tracking, averaging of gradients and state).

The names below are imported on first use: the DHT process imports this package (for the schema of progress records,
hivemind.optim.progress_schema) and stays free of torch.
"""

from hivemind.utils.lazy_exports import lazy_exports

_EXPORTS = {
    "Optimizer": "hivemind.optim.optimizer",
    "GradScaler": "hivemind.optim.grad_scaler",
    "TrainingAverager": "hivemind.optim.training_averager",
    "GradientAverager": "hivemind.optim.grad_averager",
    "PowerSGDGradientAverager": "hivemind.optim.power_sgd_averager",
    "TrainingStateAverager": "hivemind.optim.state_averager",
    "ProgressTracker": "hivemind.optim.progress_tracker",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
del lazy_exports
