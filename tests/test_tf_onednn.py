"""TensorFlow's oneDNN kernels are turned on before TensorFlow starts, only where the
user has not chosen (see keras_minsnr.tf_onednn)."""

import io
import os
import subprocess
import sys

import pytest

from keras_minsnr import tf_onednn
from keras_minsnr import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fresh_tensorflow(monkeypatch):
    monkeypatch.setattr(tf_onednn, "_tensorflow_imported", lambda: False)


def test_sets_the_variable_when_unset_and_says_so(fresh_tensorflow):
    environ, stream = {}, io.StringIO()
    assert tf_onednn.configure("tensorflow", environ, stream)
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": "1"}
    assert "TF_ENABLE_ONEDNN_OPTS=0 to opt out" in stream.getvalue()


@pytest.mark.parametrize("value", ["0", "1", ""])
def test_a_value_the_user_set_is_kept(fresh_tensorflow, value):
    environ = {"TF_ENABLE_ONEDNN_OPTS": value}
    assert not tf_onednn.configure("tensorflow", environ, io.StringIO())
    assert environ == {"TF_ENABLE_ONEDNN_OPTS": value}


def test_nothing_is_set_for_jax_or_after_the_opt_out(fresh_tensorflow):
    environ = {}
    assert not tf_onednn.configure("jax", environ, io.StringIO())
    environ = {xla_flags.OPT_OUT_VARIABLE: "0"}
    assert not tf_onednn.configure("tensorflow", environ, io.StringIO())
    assert "TF_ENABLE_ONEDNN_OPTS" not in environ


def test_nothing_is_set_once_tensorflow_is_imported(monkeypatch):
    # TensorFlow has read the variable by then: setting it would claim what is not so.
    monkeypatch.setattr(tf_onednn, "_tensorflow_imported", lambda: True)
    environ = {}
    assert not tf_onednn.configure("tensorflow", environ, io.StringIO())
    assert environ == {}


def _child_onednn(environ):
    code = ("import keras_minsnr, sys; from keras_minsnr import tf_onednn; "
            "print(tf_onednn.is_enabled(), keras_minsnr.ONEDNN_SET)")
    done = subprocess.run([sys.executable, "-c", code], env=environ, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.split()[-2:], done.stderr


def test_real_tensorflow_runs_onednn_after_import_keras_minsnr():
    # The real seam: TensorFlow itself reports whether its oneDNN kernels are on.
    environ = {k: v for k, v in os.environ.items()
               if k not in ("TF_ENABLE_ONEDNN_OPTS", xla_flags.OPT_OUT_VARIABLE)}
    environ["KERAS_BACKEND"] = "tensorflow"
    (enabled, set_here), stderr = _child_onednn(environ)
    assert (enabled, set_here) == ("True", "True")
    assert tf_onednn.announcement() in stderr
