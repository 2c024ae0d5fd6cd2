"""`lightnets repro wm-table`, `wm-param-stats`, `wm-fused` at toy scale (1 seed, 2 steps)."""

from __future__ import annotations

import json

import pytest

from lightnets.cli import main

TINY = [
    "--seeds", "1", "--max-steps", "2", "--widths", "4,8", "--no-progress",
    "--set", "data.args={size = 32, length = 4, seed = 0}",
    "--set", "data.batch_size=2",
    "--set", "data.eval_batch_size=4",
    "--set", "data.image_size=[24, 24]",
]  # fmt: skip


@pytest.fixture(scope="module")
def table_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wm") / "table"
    argv = ["repro", "wm-table", *TINY, "--variants", "baseline,alpha0.5,gate", "--out", str(out)]
    assert main(argv) == 0
    return out


def test_wm_table_files_and_layout(table_dir):
    for name in ("results.md", "results.json", "results.csv", "results.png"):
        assert (table_dir / name).is_file(), name
    assert (table_dir / "table1.md").is_file() and (table_dir / "fig4.png").is_file()
    text = (table_dir / "table1.md").read_text()
    head = [line for line in text.splitlines() if line.startswith("| W_BN")][0]
    for col in ("# params (ours)", "MACs (ours)", "paper GFLOPs", "mIoU (ours)", "Mean acc."):
        assert col in head
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split("|")[2].strip() for r in rows] == [
        "Baseline", "alpha_i = 0.5", "Gating mechanism"
    ]  # fmt: skip
    # params / MACs at the paper's width (5,246,370; gate +349,600), paper numbers beside
    assert "5,246,370" in rows[0] and "5.11M" in rows[0] and "2.07G" in rows[0]
    assert "(+0)" in rows[1] and "+4" in rows[1] and "79.45" in rows[1]
    assert "(+349,600)" in rows[2] and "+0.34M" in rows[2] and "6.18" in rows[2]
    assert "±" not in rows[0]  # one seed: no spread shown
    data = json.loads((table_dir / "results.json").read_text())
    assert data["experiment"] == "wm-table"
    assert [v["status"] for v in data["variants"]] == ["ok"] * 3
    assert data["variants"][1]["paper"] == pytest.approx(79.45)


def test_wm_param_stats_reuses_table_runs(table_dir, capsys):
    argv = ["repro", "wm-param-stats", *TINY, "--variants", "baseline,alpha0.5,gate"]
    assert main([*argv, "--out", str(table_dir)]) == 0
    out = capsys.readouterr().out
    assert out.count("skip (finished)") == 3
    stats = json.loads((table_dir / "param_stats.json").read_text())
    assert set(stats) == {"baseline", "alpha0.5", "gate"}
    conv = stats["baseline"]["conv_weight"]
    assert conv["layers"][0] == "stem.conv" or conv["layers"][0].startswith("stem")
    assert len(conv["mean"]) == len(conv["var"]) == len(conv["layers"]) > 5
    assert all(v >= 0 for v in conv["var"])
    assert len(stats["gate"]["conv_weight"]["layers"]) > len(conv["layers"])  # gate convs
    assert stats["baseline"]["bn_weight"]["layers"] and stats["baseline"]["bias"]["layers"]
    assert (table_dir / "fig5.png").is_file()


def test_wm_table_bn_ones_gives_table2(tmp_path):
    out = tmp_path / "ones"
    argv = ["repro", "wm-table", *TINY, "--bn-init", "ones", "--variants", "baseline,beta0.1"]
    assert main([*argv, "--out", str(out)]) == 0
    text = (out / "table2.md").read_text()
    assert "Table II" in text and "77.16" in text and (out / "fig6.png").is_file()
    from lightnets.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "beta0.1" / "seed0" / "last.pt")
    assert ckpt["model_args"]["bn_weight_init"] == "ones"
    assert ckpt["model_args"]["fusion"] == "beta" and ckpt["model_args"]["beta"] == 0.1


def test_wm_fused(tmp_path):
    out = tmp_path / "fused"
    assert main(["repro", "wm-fused", *TINY, "--out", str(out)]) == 0
    assert (out / "fig9.png").is_file() and (out / "results.md").is_file()
    data = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in data["variants"]] == ["w0.5", "w1"]
    from lightnets.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(out / "w1" / "seed0" / "last.pt")
    assert ckpt["model_name"] == "fused_unet" and ckpt["model_args"]["weight"] == 1.0
    # the paper's own statistics beside ours: best of N and runs above 79.5%
    table = (out / "fig9.md").read_text()
    finals = {v["name"]: v["runs"][0]["final"] for v in data["variants"]}
    assert f"| weight 0.5 | {finals['w0.5']:.2f} (N=1) | 80.15 |" in table
    assert "| 5 of 10 |" in table and "| 1 of 10 |" in table


@pytest.mark.parametrize(
    "argv, message",
    [
        (["wm-table", "--data", "buildings"], "needs --root"),
        (["wm-table", "--root", "/tmp"], "reads no files"),
        (["wm-table", "--variants", "alpha0.3"], "--variants"),
        (["wm-table", "--widths", "8"], "--widths"),
        (["wm-fused", "--seeds", "0"], "--seeds"),
        (["wm-param-stats", "--max-steps", "0"], "--max-steps"),
        (["wm-fused", "--data", "buildings", "--root", "/nonexistent/tiles"], "no such directory"),
    ],
)
def test_bad_input_exit_2(argv, message, tmp_path, capsys):
    assert main(["repro", *argv, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
