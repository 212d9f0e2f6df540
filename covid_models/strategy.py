"""Choosing the distribution strategy for the hardware at hand."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class StrategyChoice:
    strategy: object  # tf.distribute.Strategy
    kind: str  # "tpu" | "multi-gpu" | "gpu" | "cpu"
    replicas: int
    mixed_precision: bool


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
