"""A RemoteExpert called with a 0-d tensor is refused at once by a TypeError that names the input and says to add a
batch dimension (it failed with torch's bare 'len() of a 0-d tensor' from inside the call); inputs of other layouts
(transposed, strided, expanded with stride 0) give the same outputs and gradients as the module itself."""

import pytest
import torch
from moe_swarm_helpers import serving_experts

from hivemind.moe import ModuleBackend
from hivemind.moe.server.dht_handler import get_experts
from hivemind.utils.tensor_descr import BatchTensorDescriptor


@pytest.fixture(scope="module")
def expert_and_module():
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 4)
    backend = ModuleBackend(
        "odd.0", module, args_schema=(BatchTensorDescriptor(4),), max_batch_size=16,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
    )  # fmt: skip
    with serving_experts({"odd.0": backend}) as (_, client_dht):
        (expert,) = get_experts(client_dht, ["odd.0"])
        yield expert, module


@pytest.mark.timeout(60)
def test_a_0d_input_is_refused_with_a_hint(expert_and_module):
    expert, _ = expert_and_module
    with pytest.raises(TypeError, match=r"input #0 is a 0-d tensor.*batch dimension"):
        expert(torch.tensor(1.0))


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "make_input",
    [lambda: torch.randn(4, 3).t(), lambda: torch.randn(3, 8)[:, ::2], lambda: torch.randn(1, 4).expand(3, 4)],
    ids=["transposed", "strided", "expanded"],
)
def test_inputs_of_other_layouts_give_the_modules_outputs_and_gradients(expert_and_module, make_input):
    expert, module = expert_and_module
    inputs = make_input().requires_grad_(True)
    outputs = expert(inputs)
    torch.testing.assert_close(outputs, module(inputs.detach()))
    (gradient,) = torch.autograd.grad(outputs.sum(), inputs)
    torch.testing.assert_close(gradient, module.weight.detach().sum(0).expand(3, 4))
