"""The command line of every scenario (:mod:`benchmarks._scenario`): the options, their defaults
(or ``--quick`` ones) from the :class:`~benchmarks._scenario.Scenario`, and the :class:`ScenarioConfig`
they make, which the results JSON records verbatim."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from benchmarks._cli import (
    NON_NEGATIVE,
    NON_NEGATIVE_INT,
    POSITIVE_INT,
    add_distributed_flag,
    method_list,
    resolve_device,
    resolve_methods,
)
from benchmarks._learners import COOPERATIVE_METHODS, InnerBatches, offered_methods

if TYPE_CHECKING:
    from benchmarks._scenario import Scenario

__all__ = ["PRESETS", "SIZED", "ScenarioConfig", "parse_args"]

SIZED: Final[tuple[str, ...]] = ("seeds", "epochs", "train_size", "test_size", "image_size", "warmup_epochs")
"""The run-size options, whose defaults differ between a full run and ``--quick``."""
PRESETS: Final[Mapping[str, Mapping[str, Any]]] = {
    "paper": {
        "optimizer": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "schedule": "constant",
        "bound": 0.05, "noise_bound": None, "noise_scale": "absolute", "samples": 1,
    },
}
"""Named optimizer settings (``--preset``). ``paper``: the MT-COOL paper's (Sec. 4: "we adopt the
stochastic gradient descent (SGD) optimizer, and empirically set the bound value b = 0.05, the
learning rate alpha = beta = 0.1 ... M = 1") for every method; momentum, weight decay and schedule
are not stated there and are left off. Flags given explicitly override the preset."""

_HELP: Final[Mapping[str, str]] = {
    "seeds": "number of seeds 0..N-1",
    "epochs": "epochs per run",
    "train_size": "synthetic training images (real data: cap)",
    "test_size": "synthetic test images (real data: cap)",
    "image_size": "image side in pixels",
    "warmup_epochs": "MT-COOL warm-up epochs",
}


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything that determines a run; written verbatim into the JSON.

    Attributes:
        seeds: run seeds (initialisation, batch order, MT-COOL noise, synthetic data, splits).
        epochs: training epochs per run, MT-COOL's warm-up included.
        batch_size: examples per input stream and step (tasks that share their input share the batch).
        optimizer: base optimizer of every method, ``"sgd"`` or ``"adam"``.
        lr, momentum, weight_decay: base optimizer settings.
        schedule: learning rate over the run: ``"constant"``, or ``"cosine"`` (torch's
            ``CosineAnnealingLR`` from ``lr`` to 0 over all steps, the same for every method).
        methods: methods to run, in :data:`benchmarks._learners.METHODS` order.
        bound, samples, inner_steps, consistency_weight: MT-COOL b, M, L, lambda.
        inner_batches: the batches of MT-COOL's L inner steps: ``"reuse"`` (the default: every inner step
            on the training step's batch) or ``"fresh"`` (one outer iteration per L training steps, inner
            step l on the l-th step's batch); a method with its own setting (``mt_cool_m2_l10``) keeps it.
        noise: MT-COOL noise under ``--distributed``: ``"identical"`` on every rank or ``"per_rank"``.
        noise_bound: MT-COOL noise bound alone (``None``: ``bound``; the clamp keeps ``bound``).
        noise_scale: MT-COOL noise ``"absolute"`` (the paper) or ``"relative"`` to each slice's scale.
        warmup_epochs: MT-COOL warm-up length in epochs.
        cagrad_c: CAGrad's c.
        image_size: images are ``image_size`` pixels a side (``None``: the scenario has no such option).
        train_size, test_size: synthetic examples per split (real data: caps, ``None`` = all).
        data_dir: folder of the real dataset, ``None`` for the default data.
        test_fraction: real data: share held out for testing.
        device: torch device string.
        out_dir: folder for the JSON and figures.
        quick: whether ``--quick`` filled in the defaults.
        progress: whether to show the progress bar.
        distributed: ``--distributed``: train on torchrun's ranks, ``batch_size`` examples per rank.
        preset: the ``--preset`` that supplied the optimizer settings (``None``: the scenario's defaults).
    """

    seeds: tuple[int, ...]
    epochs: int
    batch_size: int
    optimizer: Literal["sgd", "adam"]
    lr: float
    momentum: float
    weight_decay: float
    schedule: Literal["constant", "cosine"]
    methods: tuple[str, ...]
    bound: float
    noise_bound: float | None
    noise_scale: Literal["absolute", "relative"]
    samples: int
    noise: Literal["identical", "per_rank"]
    inner_steps: int
    consistency_weight: float | None
    warmup_epochs: int
    cagrad_c: float
    image_size: int | None
    train_size: int | None
    test_size: int | None
    data_dir: str | None
    test_fraction: float
    device: str
    out_dir: str
    quick: bool
    progress: bool
    distributed: bool = False
    preset: str | None = None
    inner_batches: InnerBatches = "reuse"

    @property
    def side(self) -> int:
        """``image_size``, for a scenario that has the ``--image-size`` option.

        Raises:
            ValueError: when the scenario has no such option (``image_size`` is ``None``).
        """
        if self.image_size is None:
            raise ValueError("this scenario has no --image-size option (config.image_size is None); add "
                             "'image_size' to Scenario.defaults and Scenario.quick")
        return self.image_size


def _parser(scenario: Scenario, parents: Sequence[argparse.ArgumentParser] = (), prog: str | None = None,
            description: str | None = None) -> argparse.ArgumentParser:
    d, q = scenario.defaults, scenario.quick
    parser = argparse.ArgumentParser(prog=prog or f"python -m benchmarks.{scenario.name}",
                                     description=description or scenario.description, parents=list(parents))
    add = parser.add_argument
    for key in SIZED:
        if key == "image_size" and key not in d:
            continue
        kind = NON_NEGATIVE_INT if key == "warmup_epochs" else POSITIVE_INT
        text = scenario.flag_help.get(key, _HELP[key])
        shown = "all" if d[key] is None else d[key]
        add(scenario.flag(key), dest=key, metavar="N", type=kind, default=None,
            help=f"{text} (default {shown}; --quick: {q[key]})")
    add("--batch-size", type=POSITIVE_INT, default=d["batch_size"],
        help=f"examples per step, per input stream (default {d['batch_size']})")
    add("--optimizer", choices=("sgd", "adam"), default=d["optimizer"], help=f"base optimizer (default {d['optimizer']})")
    add("--lr", type=NON_NEGATIVE, default=d["lr"], help=f"learning rate (default {d['lr']})")
    add("--momentum", type=NON_NEGATIVE, default=0.0, help="SGD momentum (default 0)")
    add("--weight-decay", type=NON_NEGATIVE, default=0.0, help="weight decay (default 0)")
    add("--schedule", choices=("constant", "cosine"), default=d.get("schedule", "constant"),
        help=f"learning-rate schedule, cosine = decay to 0 over the run (default {d.get('schedule', 'constant')})")
    offered = offered_methods(scenario.networks)
    offered = d.get("methods", offered)
    add("--methods", type=method_list, default=None, help=f"comma list (default {','.join(offered)})")
    add("--bound", type=NON_NEGATIVE, default=d.get("bound", 0.05), help=f"MT-COOL bound b (default {d.get('bound', 0.05)})")
    add("--noise-bound", type=NON_NEGATIVE, default=None,
        help="MT-COOL noise bound alone; the clamp keeps --bound (default: --bound)")
    add("--noise-scale", choices=("absolute", "relative"), default="absolute",
        help="MT-COOL noise U(-b, b) (absolute, the paper's) or U(-b r, b r) with r each slice's "
             "root-mean-square value (relative); the clamp stays absolute (default absolute)")
    add("--samples", type=POSITIVE_INT, default=1, help="MT-COOL noise samples M (default 1)")
    add("--noise", choices=("identical", "per_rank"), default="identical",
        help="MT-COOL noise under --distributed: the same draws on every rank (default) or each rank its own")
    add("--inner-steps", type=POSITIVE_INT, default=1, help="MT-COOL inner steps L (default 1)")
    add("--inner-batches", choices=("reuse", "fresh"), default=d.get("inner_batches", "reuse"),
        help="MT-COOL's L inner steps: reuse = all on the training step's batch (L times Joint's base steps); "
             "fresh = one outer iteration per L training steps, inner step l on the l-th step's batch (Joint's "
             "base steps and batches); mt_cool_m2_l10 is always fresh "
             f"(default {d.get('inner_batches', 'reuse')})")
    add("--consistency-weight", type=NON_NEGATIVE, default=None, help="MT-COOL lambda (default: library's)")
    add("--cagrad-c", type=NON_NEGATIVE, default=0.4, help="CAGrad c (default 0.4)")
    add("--data-dir", default=None, help=scenario.flag_help.get(
        "data_dir", f"real dataset folder, layout: {scenario.layout}; default: {scenario.default_data}"))
    add("--test-fraction", type=float, default=0.25, help="real data: test share (default 0.25)")
    add("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu)")
    add("--out-dir", default="results", help="output folder (default results)")
    add("--quick", action="store_true",
        help=f"tiny smoke run exercising every method: {q['seeds']} seed(s), {q['epochs']} epochs")
    add("--no-progress", action="store_true", help="hide the progress bar")
    add("--preset", choices=sorted(PRESETS), default=None,
        help="named optimizer settings for every method; paper = SGD lr 0.1, b = 0.05, M = 1, constant schedule "
             "(the MT-COOL paper's); flags given explicitly override it (default: the scenario's settings)")
    add_distributed_flag(parser)
    return parser


def parse_args(
    scenario: Scenario, argv: Sequence[str] | None = None, *, parents: Sequence[argparse.ArgumentParser] = (),
    prog: str | None = None, description: str | None = None,
) -> ScenarioConfig:
    """Parse the command line into a :class:`ScenarioConfig`, filling defaults (or ``--quick`` ones).

    ``scenario.defaults`` (and ``quick``) may hold ``"methods"``, the scenario's default method list
    in place of every offered method, and ``scenario.defaults`` ``"inner_batches"``. ``parents``:
    ``argparse`` parsers (``add_help=False``) of a scenario's own options, listed in ``--help`` and
    accepted here; the scenario reads their values. ``prog`` and ``description`` replace the
    scenario's in ``--help`` and errors (a program built on the driver, ``python -m benchmarks.sweep``).

    Raises:
        ValueError: for an image size off the scenario's multiple, a test fraction outside (0, 1), or
            methods the scenario does not offer (naming those it does).
    """
    parser = _parser(scenario, parents, prog, description)
    args = parser.parse_args(argv)
    if args.preset is not None:  # the preset replaces the defaults; explicit flags still win
        parser.set_defaults(**PRESETS[args.preset])
        args = parser.parse_args(argv)
    preset = scenario.quick if args.quick else scenario.defaults
    given = {key: getattr(args, key, None) for key in SIZED}
    filled: dict[str, Any] = {key: preset.get(key) if value is None else value for key, value in given.items()}
    image_size = filled["image_size"]
    if image_size is not None and image_size % scenario.image_multiple:
        raise ValueError(
            f"--image-size must be a multiple of {scenario.image_multiple} (the network's output stride), got "
            f"{image_size}"
        )
    if not 0.0 < args.test_fraction < 1.0:
        raise ValueError(f"--test-fraction must be in (0, 1), e.g. 0.25; got {args.test_fraction!r}")
    methods = resolve_methods(args.methods if args.methods is not None else preset.get("methods"), args.distributed,
                              scenario.networks)
    if filled["warmup_epochs"] >= filled["epochs"] and set(methods) & set(COOPERATIVE_METHODS):
        print(
            f"warning: --warmup-epochs {filled['warmup_epochs']} >= --epochs {filled['epochs']}: "
            "MT-COOL runs will never leave warm-up",
            file=sys.stderr,
        )
    return ScenarioConfig(
        seeds=tuple(range(filled["seeds"])),
        epochs=filled["epochs"],
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        methods=methods,
        bound=args.bound,
        noise_bound=args.noise_bound,
        noise_scale=args.noise_scale,
        samples=args.samples,
        noise=args.noise,
        inner_steps=args.inner_steps,
        consistency_weight=args.consistency_weight,
        warmup_epochs=filled["warmup_epochs"],
        cagrad_c=args.cagrad_c,
        image_size=image_size,
        train_size=filled["train_size"],
        test_size=filled["test_size"],
        data_dir=args.data_dir,
        test_fraction=args.test_fraction,
        device=resolve_device(args.device),
        out_dir=args.out_dir,
        quick=args.quick,
        progress=not args.no_progress,
        distributed=args.distributed,
        preset=args.preset,
        inner_batches=args.inner_batches,
    )
