"""Choosing the distribution strategy for the hardware at hand, and naming that hardware.

A training's *device* (``cpu:1``, ``gpu:1``, ``multi-gpu:N``, ``tpu:N``: the strategy's kind and
its replica count) decides what it produces: the default global batch (16 per replica), per-replica
batch-norm statistics, mixed precision on one GPU, TPU numerics. It is therefore part of the model
slot's key (covid_models.train_config), fixed when the configs are planned, and checked by the
training process against the strategy it actually selects (:func:`check_device`).

Planning happens in the flow's process, which may not be where the training runs (a Dask worker, a
``train-model`` deployment on a TPU host). :func:`probe_device` says what the local process would
select without initialising a TPU: ``COVID_DEVICE`` when set (a worker's or deployment's
environment says what it is), else TPU environment variables, else the GPUs TensorFlow lists.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger(__name__)

AUTO = "auto"
DEVICE_ENV = "COVID_DEVICE"
DEVICE_KINDS = ("cpu", "gpu", "multi-gpu", "tpu")
# Set where a TPU is attached to the process (Cloud TPU tools, Colab, Kaggle). Their replica count
# is only known once the TPU is initialised, which a planning process must not do.
TPU_ENV = ("TPU_NAME", "COLAB_TPU_ADDR", "TPU_ACCELERATOR_TYPE")
_TPU_HINT = "tpu:8 on a v2-8 or v3-8, tpu:4 on a v4-8 or a v5e host with 4 chips"


class DeviceMismatchError(RuntimeError):
    """The strategy this process selected is not the device the training's config (and slot) is for."""


@dataclass(frozen=True)
class Device:
    kind: str  # one of DEVICE_KINDS
    replicas: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.replicas}"

    @classmethod
    def parse(cls, spec: str) -> Device:
        """``cpu``, ``gpu``, ``multi-gpu:N`` or ``tpu:N`` (``cpu:1``, ``gpu:1`` and ``gpu:N`` too)."""
        kind, _, count = str(spec).strip().lower().partition(":")
        if kind not in DEVICE_KINDS:
            raise ValueError(f"unknown device {spec!r}: use {AUTO}, cpu, gpu, multi-gpu:N or tpu:N (N replicas)")
        try:
            replicas = int(count) if count else None
        except ValueError:
            raise ValueError(f"device {spec!r}: the replica count after ':' must be a whole number") from None
        if replicas is not None and replicas < 1:
            raise ValueError(f"device {spec!r}: at least one replica")
        if kind == "cpu":
            if replicas not in (None, 1):
                raise ValueError(f"device {spec!r}: the CPU trains as one replica (cpu or cpu:1)")
            return cls("cpu", 1)
        if kind == "gpu" and replicas is None:
            return cls("gpu", 1)
        if replicas is None:
            # A TPU's or several GPUs' replica count changes the batch and the result: it must be said.
            hint = _TPU_HINT if kind == "tpu" else "multi-gpu:2 for two GPUs"
            raise ValueError(f"device {spec!r} needs its replica count, e.g. {hint}")
        if kind == "tpu":
            return cls("tpu", replicas)
        # MirroredStrategy over every GPU the process sees once there are two or more.
        return cls("multi-gpu", replicas) if replicas > 1 else cls("gpu", 1)


def canonical_device(spec: str) -> str:
    """``auto`` as it is, any other spec in its one spelling (``gpu`` -> ``gpu:1``)."""
    return AUTO if str(spec).strip().lower() == AUTO else str(Device.parse(spec))


def probe_device() -> str:
    """The device a training in this process would run on, without initialising a TPU."""
    env = os.environ.get(DEVICE_ENV, "").strip()
    if env and env.lower() != AUTO:
        try:
            return str(Device.parse(env))
        except ValueError as e:
            raise ValueError(f"{DEVICE_ENV}={env!r}: {e}") from None
    tpu = next((name for name in TPU_ENV if os.environ.get(name)), None)
    if tpu:
        raise ValueError(
            f"{tpu} is set, so this process would train on a TPU, whose replica count is known only once it is "
            f"initialised: set {DEVICE_ENV}=tpu:<replicas> ({_TPU_HINT})"
        )
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))  # lists devices; allocates no GPU memory
    return str(Device("multi-gpu", gpus) if gpus > 1 else Device("gpu", 1) if gpus == 1 else Device("cpu", 1))


def resolve_device(spec: str) -> str:
    """``auto`` resolved by :func:`probe_device`; any other spec in its canonical spelling."""
    spec = canonical_device(spec)
    return probe_device() if spec == AUTO else spec


@dataclass
class StrategyChoice:
    strategy: object  # tf.distribute.Strategy
    kind: str  # "tpu" | "multi-gpu" | "gpu" | "cpu"
    replicas: int
    mixed_precision: bool

    @property
    def device(self) -> str:
        return str(Device(self.kind, self.replicas))


def check_device(expected: str, choice: StrategyChoice) -> str:
    """The device ``choice`` is (``kind:replicas``); raises :class:`DeviceMismatchError` when the
    config says another one (``auto`` accepts any): a slot keyed for one device is never trained on
    another."""
    if canonical_device(expected) not in (AUTO, choice.device):
        raise DeviceMismatchError(
            f"this training's config is for device {canonical_device(expected)} (its model slot is keyed on it), "
            f"but this process selected {choice.device} ({choice.kind}, {choice.replicas} replica(s)"
            f"{', mixed precision' if choice.mixed_precision else ''}): refusing to train it here. Plan the configs "
            f"for {choice.device} ({DEVICE_ENV}={choice.device} in the planning flow's environment, or in the env of "
            f"the train deployment's work pool), or train on {canonical_device(expected)} hardware"
        )
    return choice.device


def select_strategy(allow_tpu: bool = True) -> StrategyChoice:
    """TPU through TPUClusterResolver -> TPUStrategy; several GPUs -> MirroredStrategy; one GPU ->
    the default strategy with mixed precision; otherwise the CPU."""
    import keras
    import tensorflow as tf

    if allow_tpu:
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            strategy = tf.distribute.TPUStrategy(resolver)
            choice = StrategyChoice(strategy, "tpu", strategy.num_replicas_in_sync, False)
            log.info("distribution: TPUStrategy with %d replicas (%s)", choice.replicas, resolver.master())
            return choice
        except (ValueError, RuntimeError, tf.errors.NotFoundError) as e:
            log.debug("no TPU: %s", e)
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
        choice = StrategyChoice(strategy, "multi-gpu", strategy.num_replicas_in_sync, False)
    elif len(gpus) == 1:
        keras.mixed_precision.set_global_policy("mixed_float16")
        choice = StrategyChoice(tf.distribute.get_strategy(), "gpu", 1, True)
    else:
        choice = StrategyChoice(tf.distribute.get_strategy(), "cpu", 1, False)
    log.info(
        "distribution: %s, %d replica(s)%s",
        choice.kind,
        choice.replicas,
        ", mixed precision float16" if choice.mixed_precision else "",
    )
    return choice
