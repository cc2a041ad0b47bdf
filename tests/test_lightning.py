"""CooperativeOptimizer under PyTorch Lightning's Trainer: each pattern equals the plain user loop.

The reference is ``user_loop`` of ``tests/test_user_loop.py`` (the loop the
README teaches), run on an identically built model and optimizer over the
same batches; the optimizer's seed fixes the noise. Where Lightning and the
reference execute the same operations in the same order the results are
bit-identical and compared with ``torch.equal``.

What Lightning calls (read from lightning 2.6's source, checked by these tests):

- manual optimization: ``self.optimizers()`` is a ``LightningOptimizer``, whose
  class Lightning derives from ours, so ``iteration``, ``perturb``,
  ``active_task`` ... are CooperativeOptimizer's (its state is read through
  the wrapper's attribute fall-through). ``LightningOptimizer.step()`` goes to
  the precision plugin, which (for ``32-true`` and ``bf16-mixed``) calls
  ``optimizer.step(closure=...)`` with a closure that runs no forward, inside
  our iteration: one task step. ``bf16-mixed`` runs the whole
  ``training_step`` (backward and step included) under
  ``torch.autocast("cpu", bfloat16, cache_enabled=False)``. ``global_step``
  counts every task step.
- automatic optimization: the loop calls ``optimizer.step(closure=...)`` once
  per batch outside any iteration, so ``step`` runs one outer iteration and
  calls the closure (``training_step``, ``zero_grad``, backward) once per task
  and inner step, with ``active_task`` naming the task. ``bf16-mixed`` autocasts
  the ``training_step`` only; the backward runs outside autocast.
- ``16-mixed`` (``plugins/precision/amp.py``, ``MixedPrecision.optimizer_step``):
  the plugin calls the closure itself, then ``scaler.unscale_`` and
  ``scaler.step(optimizer)`` without the closure. Under automatic
  optimization the closure therefore runs outside any outer iteration and
  ``perturb`` refuses it; manual optimization works (one
  scale/backward/unscale/step/update cycle per task step). On CPU the Trainer
  replaces ``precision="16-mixed"`` by ``bf16-mixed``, so these tests pass the
  plugin explicitly (``MixedPrecision("16-mixed", "cpu")``, a CPU GradScaler).
- DDP (``Trainer(accelerator="cpu", devices=2, strategy=...)``, gloo). Built in
  ``configure_optimizers``, after Lightning created the process group, the
  optimizer averages the stepping task's gradients over the ranks itself
  (``cooperative_opt._distributed``). Lightning's ``DDPStrategy`` also wraps
  the module in ``DistributedDataParallel``, whose reducer then needs
  ``find_unused_parameters=True``: a task's backward reaches only its own
  slices and head. With the default ``False`` the forward after the first
  task's backward fails: DDP's "Expected to have finished reduction in the
  prior iteration before starting a new one", which Lightning rewords as "It
  looks like your LightningModule has parameters that were not used in
  producing the loss returned by training_step ..." (checked by hand with
  both optimization modes, not run here). With ``True`` DDP's
  all-reduce (of every parameter, zeros for the unused) is redundant but
  harmless. A ``DDPStrategy`` whose ``configure_ddp`` does not wrap the
  module (``WithoutDDPWrapper``) leaves the averaging to the optimizer alone;
  it then must be built in ``configure_optimizers`` (built before the
  process group exists it would not synchronise, and nothing else would).
  Both are tested, with automatic and manual optimization respectively.
  The run is launched the way a user launches a script (``strategy="ddp"``
  re-executes the command for rank 1), from a subprocess: this file's
  ``__main__``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from cooperative_opt import CooperativeOptimizer  # noqa: E402
from tests.conftest import make_batches, make_model, make_tasks, params_of  # noqa: E402
from tests.test_user_loop import user_loop  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*does not have many workers")  # tiny in-memory loaders

NAMES = ["a", "b"]
#: M = 2 with the consistency term, L = 2 inner steps, one warm-up iteration first.
CONFIG: dict[str, Any] = dict(variant="mt_cool", samples=2, inner_steps=2, consistency_weight=0.5, warmup_steps=1)
STEPS = 3
BATCH = 8
Batches = dict[str, tuple[Tensor, Tensor]]
SGD: dict[str, Any] = dict(optimizer=torch.optim.SGD, lr=0.1, momentum=0.9)


def net() -> Any:
    torch.manual_seed(3)
    return make_model(NAMES)


def cooperative(model: Any, optimizer: Any = torch.optim.AdamW, **kwargs: Any) -> CooperativeOptimizer:
    kwargs = {"lr": 1e-2, **CONFIG, **kwargs}
    return CooperativeOptimizer(model, make_tasks(model, NAMES), optimizer, seed=7, **kwargs)


def batches(step: int) -> Batches:
    return make_batches(NAMES, n=BATCH, seed=step)


def loader() -> DataLoader[Any]:
    """The samples of ``batches(0..STEPS-1)`` in order, one ``{task: (x, y)}`` each: batch s is ``batches(s)``."""
    samples = [{t: (x[i], y[i]) for t, (x, y) in batches(s).items()} for s in range(STEPS) for i in range(BATCH)]
    return DataLoader(samples, batch_size=BATCH, shuffle=False)  # type: ignore[arg-type]


def task_loss(opt: Any, model: Any, name: str, batch: Any) -> Tensor:
    """One task's objective, written exactly as ``user_loop`` writes it (M perturbed forwards)."""
    outputs = []
    for _ in range(opt.settings.samples):
        with opt.perturb(name):  # first: outside an iteration (name None) it refuses with its own message
            x, y = batch[name]
            outputs.append(model(x, name))
    loss = torch.stack([F.cross_entropy(o, y) for o in outputs]).mean()
    if opt.phase == "cooperative":
        loss = loss + opt.consistency(name, outputs)
    return loss


class Module(pl.LightningModule):
    """The net; the optimizer is built where Lightning users build it (after the process group exists)."""

    def __init__(self, **optimizer: Any) -> None:
        super().__init__()
        self.net = net()
        self.optimizer_kwargs = optimizer
        self.opt: CooperativeOptimizer | None = None

    def configure_optimizers(self) -> Any:
        self.opt = cooperative(self.net, **self.optimizer_kwargs)
        return self.opt


class Manual(Module):
    """Manual optimization: the user loop inside ``training_step``, through ``LightningOptimizer``."""

    def __init__(self, **optimizer: Any) -> None:
        super().__init__(**optimizer)
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        assert not isinstance(opt, list)
        for name in opt.iteration():  # CooperativeOptimizer's own (Lightning's wrapper class derives from ours)
            self.manual_backward(task_loss(opt, self.net, name, batch))
            opt.step()
            opt.zero_grad()


class Automatic(Module):
    """Automatic optimization: Lightning's closure runs ``training_step`` once per task and inner step."""

    def __init__(self, **optimizer: Any) -> None:
        super().__init__(**optimizer)
        self.seen: list[str] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        opt = self.optimizers()
        assert not isinstance(opt, list)
        name = opt.active_task  # None if a precision plugin runs the closure outside step()
        self.seen.append(str(name))
        return task_loss(opt, self.net, name, batch)


def fit(module: pl.LightningModule, root: Path, **trainer: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root,
    )
    kwargs.update(trainer)
    t = pl.Trainer(**kwargs)
    t.fit(module, loader())
    return t


def reference(context: Callable[[], Any] = contextlib.nullcontext, outside: Callable[[], Any] = contextlib.nullcontext,
              **kwargs: Any) -> dict[str, Tensor]:
    """``user_loop`` over the same batches; ``context`` around each iteration, ``outside`` around backward and step."""
    model = net()
    opt = cooperative(model, **kwargs)

    def backward(loss: Tensor) -> None:
        with outside():
            loss.backward()

    def step() -> None:
        with outside():
            opt.step()

    for s in range(STEPS):
        with context():
            user_loop(model, opt, batches(s), backward=backward, step=step)
    assert opt.steps_taken == STEPS
    return params_of(model)


def bf16() -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # what Lightning's plugin enters


def no_autocast() -> Any:
    return torch.autocast("cpu", enabled=False)


def assert_same(got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    assert got.keys() == expected.keys()
    for k in got:
        assert torch.equal(got[k], expected[k]), k


# --------------------------------------------------------------------- single process


def trained(module: Module) -> CooperativeOptimizer:
    assert module.opt is not None
    return module.opt


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_manual_optimization_equals_the_user_loop(precision: str, tmp_path: Path) -> None:
    module = Manual()
    before = params_of(module.net)
    trainer = fit(module, tmp_path, precision=precision)
    assert trained(module).steps_taken == STEPS
    # manual optimization counts every LightningOptimizer.step(): warm-up yields each task once, then L per task
    assert trainer.global_step == len(NAMES) * (1 + CONFIG["inner_steps"] * (STEPS - 1))
    # bit-identical: the same ops in the same order; bf16-mixed autocasts the whole training_step
    expected = reference(context=bf16 if precision == "bf16-mixed" else contextlib.nullcontext)
    assert_same(params_of(module.net), expected)
    assert any(not torch.equal(before[k], v) for k, v in expected.items())
    if precision == "bf16-mixed":  # autocast really ran: float32 training ends elsewhere
        assert any(not torch.equal(v, expected[k]) for k, v in reference().items())


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_automatic_optimization_equals_the_user_loop(precision: str, tmp_path: Path) -> None:
    module = Automatic()
    trainer = fit(module, tmp_path, precision=precision)
    opt = trained(module)
    assert opt.steps_taken == STEPS and trainer.global_step == STEPS  # one optimizer.step(closure) per batch
    assert module.seen == NAMES + [n for n in NAMES for _ in range(CONFIG["inner_steps"])] * (STEPS - 1)
    report = opt.last_report
    assert report is not None and set(report.losses) == set(NAMES)  # the closure's losses are reported
    # bit-identical: bf16-mixed autocasts training_step (forward and loss); backward and step run outside it
    if precision == "bf16-mixed":
        expected = reference(context=bf16, outside=no_autocast)
    else:
        expected = reference()
    assert_same(params_of(module.net), expected)


def test_16_mixed_needs_manual_optimization(tmp_path: Path) -> None:
    # automatic: the AMP plugin runs the closure before (and outside) optimizer.step, so no task is active
    with pytest.raises(RuntimeError, match="must run inside an outer iteration"):
        fit(Automatic(), tmp_path, plugins=[MixedPrecision("16-mixed", "cpu")])

    module = Manual()
    fit(module, tmp_path, plugins=[MixedPrecision("16-mixed", "cpu")])
    plugin = module.trainer.precision_plugin
    assert isinstance(plugin, MixedPrecision) and plugin.scaler is not None
    model = net()
    opt = cooperative(model)
    scaler = torch.amp.GradScaler("cpu")

    def step() -> None:  # one unscale/step/update cycle per task step, as the plugin runs it
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()

    for s in range(STEPS):
        with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
            user_loop(model, opt, batches(s), backward=lambda loss: scaler.scale(loss).backward(), step=step)
    assert scaler.get_scale() == plugin.scaler.get_scale()
    assert_same(params_of(module.net), params_of(model))  # bit-identical: same ops, same order


# --------------------------------------------------------------------- DDP, 2 CPU processes


class WithoutDDPWrapper(DDPStrategy):
    """Lightning's DDP processes, sampler and process group, without wrapping the module in
    ``DistributedDataParallel``: the optimizer averages the stepping task's gradients itself."""

    def configure_ddp(self) -> None:
        pass


STRATEGIES: dict[str, Callable[[], DDPStrategy]] = {
    "find_unused_parameters": lambda: DDPStrategy(find_unused_parameters=True),
    "without_wrapper": WithoutDDPWrapper,
}
MODULES: dict[str, type[Module]] = {"automatic": Automatic, "manual": Manual}


def _run_ddp(out: Path, strategy: str, optimization: str) -> None:
    """The body of ``python -m tests.test_lightning OUT STRATEGY OPTIMIZATION``; Lightning re-executes it for rank 1."""
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")

    class Distributed(MODULES[optimization]):  # type: ignore[valid-type,misc]
        def train_dataloader(self) -> DataLoader[Any]:
            # Lightning's own DistributedSampler shuffles training data; deal the samples in order instead,
            # so that rank r's batch s holds the samples r, r + 2, ... of batches(s)
            data = loader().dataset
            sampler = DistributedSampler(data, num_replicas=self.trainer.world_size, rank=self.global_rank,
                                         shuffle=False)
            return DataLoader(data, batch_size=BATCH // 2, sampler=sampler)

        def on_train_end(self) -> None:
            wrapped = isinstance(self.trainer.strategy.model, torch.nn.parallel.DistributedDataParallel)
            torch.save({"params": params_of(self.net), "wrapped": wrapped}, out / f"rank{self.global_rank}.pt")

    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=STRATEGIES[strategy](), max_epochs=1, use_distributed_sampler=False,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(Distributed(**SGD))


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "optimization"), [("find_unused_parameters", "automatic"),
                                                       ("without_wrapper", "manual")])
def test_ddp_two_processes_equal_one_process_on_the_whole_batch(strategy: str, optimization: str,
                                                                tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "GLOBAL_RANK", "MASTER_", "PL_"))}
    done = subprocess.run([sys.executable, "-m", "tests.test_lightning", str(tmp_path), strategy, optimization],
                          cwd=root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    saved = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [s["wrapped"] for s in saved] == [strategy == "find_unused_parameters"] * 2
    rank0, rank1 = (s["params"] for s in saved)
    assert_same(rank0, rank1)  # every task step averaged its gradients over both ranks: no drift
    # One process on the concatenated batch of 2 x 4 samples: rank r trains on samples r, r + 2, ..., the ranks
    # average their shards' mean gradients, one process takes the mean over all 8. Equal up to float summation
    # order, hence a tolerance.
    expected = reference(**SGD)
    before = params_of(net())
    for k, v in rank0.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert any(not torch.equal(before[k], v) for k, v in rank0.items())


if __name__ == "__main__":
    _run_ddp(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
