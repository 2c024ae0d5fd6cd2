"""The LCE lane: larq 0.14 needs Keras 2, so TensorFlow must see TF_USE_LEGACY_KERAS=1 before
anything imports it (lightnets.deploy.lce sets it too, but pytest.importorskip("larq") in these
modules would import TensorFlow first)."""

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
