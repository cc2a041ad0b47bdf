"""CooperativeOptimizer under HF Accelerate: each pattern equals the plain user loop.

The reference is ``user_loop`` of ``tests/test_user_loop.py`` on an identically
built model and optimizer over the same batches (the optimizer's seed fixes
the noise). What Accelerate does (read from accelerate 1.15's source, checked here):

- ``accelerator.prepare(model, opt, loader)`` wraps our optimizer in an
  ``AcceleratedOptimizer`` (it is a ``torch.optim.Optimizer``), whose
  constructor calls ``opt.load_state_dict(opt.state_dict())``; ours is reached
  as ``.optimizer`` for ``iteration()`` / ``perturb()``.
- ``AcceleratedOptimizer.step()`` calls ``opt.step(None)`` (inside our
  iteration: the active task's step) unless gradients are being accumulated;
  ``zero_grad()`` likewise.
- ``accelerator.backward(loss)`` divides by ``gradient_accumulation_steps``.
- ``mixed_precision="bf16"`` replaces the model's ``forward`` by one under
  ``torch.autocast("cpu", bfloat16)`` that returns float32 outputs.
- ``accumulate()`` syncs on every k-th call, and on every call while a prepared
  loader serves its last batch (``sync_with_dataloader=True``, the default):
  with micro-batches taken inside one loader batch that would step a task
  twice in one inner step, so these tests set ``sync_with_dataloader=False``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

accelerate = pytest.importorskip("accelerate")

from accelerate import Accelerator  # noqa: E402
from accelerate.optimizer import AcceleratedOptimizer  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import GradientAccumulationPlugin  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cooperative_opt import CooperativeOptimizer  # noqa: E402
from tests.conftest import make_batches, make_model, make_tasks, params_of  # noqa: E402
from tests.test_user_loop import user_loop  # noqa: E402

NAMES = ["a", "b"]
#: M = 2 with the consistency term, L = 2 inner steps, one warm-up iteration first.
CONFIG: dict[str, Any] = dict(variant="mt_cool", samples=2, inner_steps=2, consistency_weight=0.5, warmup_steps=1)
STEPS = 3
BATCH = 8


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """``Accelerator`` keeps process-wide singleton state (device, mixed precision, accumulation steps)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def build(config: dict[str, Any] = CONFIG) -> tuple[Any, CooperativeOptimizer]:
    torch.manual_seed(3)
    model = make_model(NAMES)
    opt = CooperativeOptimizer(model, make_tasks(model, NAMES), torch.optim.AdamW, lr=1e-2, seed=7, **config)
    return model, opt


def batches(step: int) -> dict[str, tuple[Tensor, Tensor]]:
    return make_batches(NAMES, n=BATCH, seed=step)


def loader() -> DataLoader[Any]:
    """The samples of ``batches(0..STEPS-1)`` in order, one ``{task: (x, y)}`` each: batch s is ``batches(s)``."""
    samples = [{t: (x[i], y[i]) for t, (x, y) in batches(s).items()} for s in range(STEPS) for i in range(BATCH)]
    return DataLoader(samples, batch_size=BATCH, shuffle=False)  # type: ignore[arg-type]


def task_loss(opt: CooperativeOptimizer, model: Any, name: str, x: Tensor, y: Tensor) -> Tensor:
    """One task's objective, written exactly as ``user_loop`` writes it (M perturbed forwards)."""
    outputs = []
    for _ in range(opt.settings.samples):
        with opt.perturb(name):
            outputs.append(model(x, name))
    loss = torch.stack([F.cross_entropy(o, y) for o in outputs]).mean()
    if opt.phase == "cooperative":
        loss = loss + opt.consistency(name, outputs)
    return loss


def prepared(accelerator: Accelerator, config: dict[str, Any] = CONFIG) -> tuple[Any, AcceleratedOptimizer, CooperativeOptimizer, Any]:
    model, opt = build(config)
    model, wrapped, data = accelerator.prepare(model, opt, loader())
    assert isinstance(wrapped, AcceleratedOptimizer) and wrapped.optimizer is opt
    assert wrapped.param_groups is opt.base.param_groups  # the state_dict round trip kept the groups shared
    return model, wrapped, opt, data


def assert_same(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_prepare_and_backward_equal_the_user_loop(mixed_precision: str) -> None:
    accelerator = Accelerator(cpu=True, mixed_precision=mixed_precision)
    model, wrapped, opt, data = prepared(accelerator)
    for batch in data:
        for name in opt.iteration():
            accelerator.backward(task_loss(opt, model, name, *batch[name]))
            wrapped.step()
            wrapped.zero_grad()
    assert opt.steps_taken == STEPS and "cooperative" in wrapped.state_dict()

    reference, ref_opt = build()

    def forward(x: Tensor, name: str) -> Tensor:  # what prepare() makes of forward under bf16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return reference(x, name).float()

    for s in range(STEPS):
        user_loop(forward if mixed_precision == "bf16" else reference, ref_opt, batches(s))
    # bit-identical: the same ops in the same order (accelerator.backward divides by 1)
    assert_same(params_of(model), params_of(reference))
    if mixed_precision == "bf16":  # autocast really ran: float32 training ends elsewhere
        plain, plain_opt = build()
        for s in range(STEPS):
            user_loop(plain, plain_opt, batches(s))
        assert params_of(plain).keys() == params_of(model).keys()
        assert any(not torch.equal(v, params_of(model)[k]) for k, v in params_of(plain).items())


ACCUMULATE: dict[str, Any] = dict(variant="without_reg", samples=1, inner_steps=2, warmup_steps=1)


def accumulate(accelerator: Accelerator) -> tuple[Any, CooperativeOptimizer]:
    """Two micro-batches per task and inner step under one ``perturb`` entry, so both see one noise draw
    (an entry per micro-batch would draw afresh for each). The warm-up iteration runs two backwards through
    the same entry's ``theta + eps``."""
    model, wrapped, opt, data = prepared(accelerator, ACCUMULATE)
    for batch in data:
        for name in opt.iteration():
            x, y = batch[name]
            with opt.perturb(name):
                for xm, ym in zip(x.chunk(2), y.chunk(2)):
                    with accelerator.accumulate(model):
                        accelerator.backward(F.cross_entropy(model(xm, name), ym))
                        wrapped.step()  # a no-op on the first micro-batch
                        wrapped.zero_grad()
    return model, opt


def test_gradient_accumulation_equals_one_step_on_the_whole_batch() -> None:
    plugin = GradientAccumulationPlugin(num_steps=2, sync_with_dataloader=False)
    model, opt = accumulate(Accelerator(cpu=True, gradient_accumulation_plugin=plugin))
    assert opt.steps_taken == STEPS
    reference, ref_opt = build(ACCUMULATE)
    for s in range(STEPS):
        user_loop(reference, ref_opt, batches(s))
    # the two half-batch means, each divided by 2, sum to the whole-batch mean up to float rounding
    expected = params_of(reference)
    for k, v in params_of(model).items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_accumulation_synced_with_the_loader_steps_twice_on_the_last_batch() -> None:
    # the default sync_with_dataloader=True syncs every micro-batch of the loader's last batch
    with pytest.raises(RuntimeError, match="already called in this inner step"):
        accumulate(Accelerator(cpu=True, gradient_accumulation_steps=2))
