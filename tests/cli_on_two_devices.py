"""Runs `keras-minsnr ARGS` on two devices: logical CPUs on TensorFlow; on JAX the caller
sets ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (fixed when JAX starts)."""

import os
import sys

if os.environ.get("KERAS_BACKEND") == "tensorflow":
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

from keras_minsnr import cli  # noqa: E402

sys.exit(cli.main(sys.argv[1:]))
