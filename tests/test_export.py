"""A trained split model leaves this library behind: TorchScript and ONNX exports compute the same outputs."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
import torch.nn.functional as F

import adapters
from cooperative_opt import CooperativeOptimizer

timm = pytest.importorskip("timm")
import adapters.timm  # noqa: E402


def _trained_net() -> adapters.MultiTaskModel:
    torch.manual_seed(0)
    net = adapters.timm.multitask("resnet18", {"a": 2, "b": 3})
    tasks = adapters.make_tasks(net, {"a": F.cross_entropy, "b": F.cross_entropy})
    opt = CooperativeOptimizer(net, tasks, torch.optim.SGD, lr=0.05, variant="without_reg", seed=0)
    batches = {"a": (torch.randn(4, 3, 32, 32), torch.randint(0, 2, (4,))),
               "b": (torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,)))}
    for _ in range(2):
        opt.step(batches)
    return net.eval()


def test_torchscript_trace_of_exported_task_matches() -> None:
    net = _trained_net()
    x = torch.randn(2, 3, 32, 32)
    exported = net.export("b")
    assert not any("parametrizations" in n for n, _ in exported.named_parameters())
    traced = torch.jit.trace(exported, (x,))
    with torch.no_grad():
        assert torch.equal(traced(x), net(x, "b"))


def test_onnx_export_of_exported_task_matches() -> None:
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    net = _trained_net()
    x = torch.randn(2, 3, 32, 32)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its deprecation
        torch.onnx.export(net.export("a"), (x,), buffer, dynamo=False, input_names=["x"])
    session = ort.InferenceSession(buffer.getvalue())
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = net(x, "a").numpy()
    assert abs(out - expected).max() < 1e-5
