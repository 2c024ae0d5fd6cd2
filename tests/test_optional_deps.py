"""The core works without the extras (onnx, plots, augment): import, train, profile, fuse; a
feature that needs one says which extra to install. Run in a subprocess whose imports of
the extras' packages fail, as on a machine without them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

BLOCKED = ("onnx", "onnxruntime", "onnxscript", "kornia", "matplotlib")

SCRIPT = textwrap.dedent(
    """
    import json, sys
    for name in {blocked!r}:
        sys.modules[name] = None  # `import name` now raises ImportError
    import torch
    import lightnets as ln
    from lightnets.engine import Trainer
    from lightnets.engine.config import load_config
    from lightnets.errors import UserError

    out = {{}}
    run = sys.argv[1]
    overrides = [
        "model.args.width=8", "train.max_steps=2", "train.progress=false", "schedule.warmup=0"
    ]
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(load_config("mnist_cnn", overrides), run)
        trainer.fit()
    out["plot_warning"] = [str(w.message) for w in caught if "curves.png" in str(w.message)]
    out["trained"] = trainer.step
    model = trainer.model.eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        out["fused_same"] = bool(torch.allclose(ln.fuse(model)(x), model(x), atol=1e-5))
    out["params"] = ln.profile(model, (1, 1, 28, 28)).params
    errors = {{}}
    try:
        ln.export(model, run + "/m.onnx", (1, 1, 28, 28))
    except UserError as err:
        errors["onnx"] = str(err)
    try:
        from lightnets.data import build_batch_augment
        build_batch_augment(["hflip"], image_size=28)(torch.rand(2, 1, 28, 28))
    except UserError as err:
        errors["augment"] = str(err)
    out["errors"] = errors
    out["loaded"] = sorted(m for m in {blocked!r} if sys.modules.get(m) is not None)
    print(json.dumps(out))
    """
)


def test_core_works_without_the_extras_and_names_them(tmp_path):
    code = SCRIPT.format(blocked=BLOCKED)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["trained"] == 2 and out["params"] > 0 and out["fused_same"]
    assert out["loaded"] == []
    assert len(out["plot_warning"]) == 1 and "lightnets[plots]" in out["plot_warning"][0]
    assert "lightnets[onnx]" in out["errors"]["onnx"] and "ONNX export" in out["errors"]["onnx"]
    assert "lightnets[augment]" in out["errors"]["augment"]
    assert "'hflip'" in out["errors"]["augment"]
