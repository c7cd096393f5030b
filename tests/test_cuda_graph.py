"""What the CPU can check of `train.cuda_graph`: the step it would capture is fit to be replayed.

A CUDA graph replays the kernels of one recorded call with the arguments they had then. So the
step's operations must be the same at every step, with the same non-tensor arguments (a Python
number that changes from step to step, such as an EMA decay or a slot index, would be frozen
at its captured value), and must never wait for a device value on the host. These tests record
every aten operation of the real loop's step at two different steps of each kind (with lazy R1, a
step with the penalty and one without are two graphs) and compare them.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import TINY
from train import config, cuda_graph, loop, models

# With lazy R1 every 3rd step: steps 2 and 5 without the penalty, 3 and 6 with it (two graphs), all during
# the EMA's ramp-up and at different fault-record slots.
PLAIN_CALLS, R1_CALLS = (2, 5), (3, 6)


VALUES = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def describe(argument):
    """A tensor by shape, dtype and device, a plain value as itself, anything else (a profiler handle) by its type."""
    if isinstance(argument, torch.Tensor):
        return tuple(argument.shape), argument.dtype, argument.device.type
    return argument if isinstance(argument, VALUES) else type(argument).__name__


class OperationLog(TorchDispatchMode):
    """Every aten operation with its non-tensor arguments; tensors are described by shape, dtype and device."""

    def __init__(self):
        super().__init__()
        self.operations = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        flat, _ = tree_flatten((args, kwargs or {}))
        described = tuple(describe(a) for a in flat)
        self.operations.append((str(func), described))
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module", params=[False, True], ids=["unconditional", "conditional"])
def recorded_steps(tmp_path_factory, request):
    recorded = {}

    class RecordingStep(cuda_graph.ReplayableStep):
        calls = 0

        def __call__(self, *arguments):
            RecordingStep.calls += 1
            if RecordingStep.calls not in PLAIN_CALLS + R1_CALLS:
                return super().__call__(*arguments)
            with OperationLog() as log:
                super().__call__(*arguments)
            recorded[RecordingStep.calls] = log.operations

    run_dir = tmp_path_factory.mktemp("run")
    original, loop.ReplayableStep = loop.ReplayableStep, RecordingStep
    try:
        # With the R1 penalty, so that its double backward is checked as well.
        cfg = config.load(None, TINY + [f"run.dir={run_dir}", "model.arch=seed", "loss.r1_gamma=1",
                                        "loss.r1_every=3", f"model.conditional={str(request.param).lower()}"])
        assert loop.train(cfg, resume_from=None) == 0
    finally:
        loop.ReplayableStep = original
    return recorded


def names(operations):
    return [name for name, _ in operations]


def test_the_step_records_forward_backward_and_both_optimizers(recorded_steps):
    for call in (PLAIN_CALLS[0], R1_CALLS[0]):
        assert "aten.convolution_backward.default" in names(recorded_steps[call])  # backward ran under the recorder
        assert names(recorded_steps[call]).count("aten._fused_adam_.default") == 2


def test_only_the_lazy_r1_steps_backpropagate_through_ds_gradient(recorded_steps):
    plain, r1 = (names(recorded_steps[calls[0]]).count("aten.convolution_backward.default")
                 for calls in (PLAIN_CALLS, R1_CALLS))
    assert r1 > plain  # the penalty's input gradient and its backward: more passes through D's convolutions


@pytest.mark.parametrize("calls", [PLAIN_CALLS, R1_CALLS], ids=["plain", "r1"])
def test_every_step_runs_the_same_operations_with_the_same_arguments(recorded_steps, calls):
    first, later = (recorded_steps[call] for call in calls)
    assert len(first) == len(later)
    for index, (a, b) in enumerate(zip(first, later)):
        assert a == b, f"operation {index} differs between steps {calls}: {a} vs {b}"


def test_the_step_never_reads_a_device_value_on_the_host(recorded_steps):
    for call in PLAIN_CALLS + R1_CALLS:
        assert "aten._local_scalar_dense.default" not in names(recorded_steps[call])  # .item(), bool(tensor)


@pytest.mark.parametrize("conditional", [False, True], ids=["unconditional", "conditional"])
@pytest.mark.parametrize("arch", ["seed", "dcgan"])
def test_the_networks_read_no_host_tensor_forward_or_backward(arch, conditional):
    """On a GPU a tensor made on the host inside a network is a copy every step and, under
    torch.compile, one that a CUDA graph cannot capture (seen on an H200 with the seed generator's
    interpolation matrices). With the networks on the meta device, any such tensor shows."""
    generator, discriminator = (network.to("meta") for network in models.build(arch, 100, conditional=conditional))
    labels = torch.zeros(4, dtype=torch.long, device="meta") if conditional else None
    with OperationLog() as log:
        images = generator(torch.randn(4, 100, device="meta"), labels)
        discriminator(images, labels).sum().backward()
    assert log.operations  # the forward and backward were recorded
    assert [name for name, arguments in log.operations if any(
        isinstance(argument, tuple) and argument[-1] == "cpu" for argument in arguments)] == []
