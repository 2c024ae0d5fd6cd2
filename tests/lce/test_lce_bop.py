"""The LCE lane: our Bop against larq's own Bop (TensorFlow), bit for bit.

tests/optim/test_bop_larq.py checks the same against larq's arithmetic written in numpy; this
runs larq itself (`lq.optimizers.Bop.apply_gradients`) on the same seeded gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("larq", reason='needs pip install "lightnets[lce]"')

from lightnets.deploy.larq_model import lce_stack  # noqa: E402  (TensorFlow with Keras 2)
from lightnets.optim import Bop  # noqa: E402

SHAPES = [(257, 256), (3, 3, 8, 16), (10,)]


@pytest.mark.parametrize("gamma, threshold, steps", [(1e-3, 1e-6, 300), (1e-2, 0.0, 100)])
def test_bop_equals_larq_itself(gamma, threshold, steps):
    stack = lce_stack()
    tf, lq = stack.tf, stack.lq
    rng = np.random.default_rng(0)
    start = [np.where(rng.standard_normal(s) < 0, -1.0, 1.0).astype(np.float32) for s in SHAPES]
    drift = [rng.standard_normal(s).astype(np.float32) * np.float32(1e-3) for s in SHAPES]
    variables = [tf.Variable(w) for w in start]
    larq_bop = lq.optimizers.Bop(threshold=threshold, gamma=gamma)
    params = [nn.Parameter(torch.from_numpy(w.copy())) for w in start]
    ours = Bop(params, threshold=threshold, gamma=gamma, flip_test="larq")
    for t in range(steps):
        grads = []
        for i, s in enumerate(SHAPES):
            g = drift[i] + rng.standard_normal(s).astype(np.float32) * np.float32(2e-3)
            if i == 2 and t < 20:
                g = np.zeros(s, np.float32)  # zero gradients at tau = 0: larq's ties
            grads.append(g)
        larq_bop.apply_gradients(zip([tf.constant(g) for g in grads], variables))
        for p, g in zip(params, grads):
            p.grad = torch.from_numpy(g)
        ours.step()
    for i, (v, p) in enumerate(zip(variables, params)):
        m_larq = larq_bop.get_slot(v, "m").numpy()
        m_ours = ours.state[p]["m"].numpy()
        assert np.array_equal(m_larq.view(np.int32), m_ours.view(np.int32)), i
        assert np.array_equal(v.numpy(), p.detach().numpy()), i
