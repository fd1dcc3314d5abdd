"""The tensors of a TrainingStateAverager: the ones it averages (and their compression keys), the offloaded copies
of the model's parameters and their gradients."""

from __future__ import annotations

from typing import List, Sequence

import torch

from hivemind.compression import CompressionInfo, TensorRole

__all__ = ["TrainingStateTensors"]


class TrainingStateTensors:
    """Mixed into TrainingStateAverager (which sets ``main_parameters``, ``_optimizer_parameters``, ``optimizer``,
    ``average_opt_statistics``, ``extra_tensors``, ``offload_optimizer`` and ``custom_gradients``)."""

    @staticmethod
    def _make_offloaded_copy(param: torch.Tensor) -> torch.Tensor:
        return torch.nn.Parameter(param.detach().to("cpu", copy=True), requires_grad=param.requires_grad)

    def _optimizer_statistics(self) -> List[torch.Tensor]:
        statistics = []
        for name in self.average_opt_statistics:
            for param in self._optimizer_parameters:
                value = self.optimizer.state.get(param, {}).get(name)
                if not isinstance(value, torch.Tensor):
                    raise ValueError(f"the optimizer has no tensor statistic {name!r} for every parameter")
                statistics.append(value)
        return statistics

    def _averaging_sources(self) -> List[torch.Tensor]:
        """The live tensors averaged with peers, in the original library's order (peers of both average together):
        optimizer parameters, chosen statistics (statistic by statistic, each for every parameter), extra tensors."""
        return [*self._optimizer_parameters, *self._optimizer_statistics(), *self.extra_tensors]

    def _tensor_infos(self, sources: Sequence[torch.Tensor]) -> List[CompressionInfo]:
        """As the original library's: parameter ``i`` has key ``i``, a statistic ``(i, name)``, extra tensor ``j``
        key ``j`` (the keys of a PerTensorCompression), with roles PARAMETER, OPTIMIZER, UNSPECIFIED."""
        num_params = len(self._optimizer_parameters)
        keys = [(index, TensorRole.PARAMETER) for index in range(num_params)]
        statistics = [(index, name) for name in self.average_opt_statistics for index in range(num_params)]
        keys += [(key, TensorRole.OPTIMIZER) for key in statistics]
        keys += [(index, TensorRole.UNSPECIFIED) for index in range(len(self.extra_tensors))]
        return [CompressionInfo.from_tensor(tensor, key=key, role=role) for tensor, (key, role) in zip(sources, keys)]

    @torch.no_grad()
    def _copy_optimizer_parameters_to_model(self) -> None:
        if self.offload_optimizer:
            for main, offloaded in zip(self.main_parameters, self._optimizer_parameters):
                main.copy_(offloaded, non_blocking=True)

    @torch.no_grad()
    def _load_gradients_into_optimizer(self) -> None:
        if not self.offload_optimizer or self.custom_gradients:
            return
        for main, offloaded in zip(self.main_parameters, self._optimizer_parameters):
            if main.grad is None:
                offloaded.grad = None
            elif offloaded.grad is None:
                offloaded.grad = main.grad.detach().to("cpu", copy=True)
            else:
                offloaded.grad.copy_(main.grad, non_blocking=True)

    def zero_model_grads(self, set_to_none: bool) -> None:
        """Clear the gradients of the model's parameters (``main_parameters``)."""
        for param in self.main_parameters:
            if param.grad is not None:
                if set_to_none:
                    param.grad = None
                else:
                    param.grad.detach_().zero_()
