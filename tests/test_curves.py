"""`plait plot`: runs' loss curves from metrics.jsonl, their table and PNG, and what it refuses."""

import json

import pytest

from plait.train.curves import main, read_run, smoothed, summary


def write_log(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_and_png_from_two_runs(tmp_path, capsys):
    write_log(tmp_path / "a", [{"step": 1, "loss": 5.0, "lr": 1e-3, "tokens_per_s": 100.0},
                               {"step": 2, "loss": 4.0, "lr": 2e-3, "tokens_per_s": 300.0},
                               {"step": 2, "val_loss": 4.5},
                               {"step": 3, "loss": 9.0, "tokens_per_s": 200.0},  # cut short, then resumed:
                               {"step": 3, "loss": 3.5, "tokens_per_s": 200.0},  # the last record of a step wins
                               {"step": 4, "loss": 3.0, "tokens_per_s": 250.0}, {"step": 4, "val_loss": 3.2}])
    write_log(tmp_path / "b", [{"step": 1, "loss": 6.0}, {"step": 2, "loss": 5.5}])
    run = read_run(str(tmp_path / "a"))
    assert run.loss == {1: 5.0, 2: 4.0, 3: 3.5, 4: 3.0}
    assert summary(run) == {"steps": 4, "last_loss": 3.0, "best_val_loss": 3.2, "best_val_step": 4,
                            "median_tokens_per_s": 225.0}
    out = tmp_path / "loss.png"
    assert main([str(tmp_path / "a"), str(tmp_path / "b" / "metrics.jsonl"), "--out", str(out), "--lr",
                 "--smooth", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["a", "4", "3.0000", "3.2000", "4", "225"]
    assert lines[2].split() == ["b", "2", "5.5000", "-", "-", "-"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list(tmp_path.glob("*.tmp.png"))


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smoothed([4.0, 2.0], 0.5) == pytest.approx([4.0, (0.25 * 4 + 0.5 * 2) / 0.75])
    assert smoothed([1.0, 1.0, 1.0], 0.9) == pytest.approx([1.0, 1.0, 1.0])


def test_refusals_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    write_log(tmp_path / "b", [{"step": 1, "loss": 5.0}])
    write_log(tmp_path / "cut", [{"step": 1, "loss": 5.0}])
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 2, "lo')
    assert read_run(str(tmp_path / "cut")).loss == {1: 5.0}  # a run still writing its last record
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as handle:
        handle.write('\n{"step": 3, "loss": 4.0}\n')  # a damaged line inside the log is an error
    cases = {(str(tmp_path / "empty"),): "holds no metrics.jsonl",
             (str(tmp_path / "cut"),): "line 2 is not JSON",
             (str(tmp_path / "cut"), "--smooth", "1"): "--smooth 1.0 must be in [0, 1)"}
    (tmp_path / "a-file").write_text("x")
    assert main([str(tmp_path / "b"), "--out", str(tmp_path / "a-file" / "x.png")]) == 2
    assert "cannot be written (it is a file" in capsys.readouterr().err
    for argv, message in cases.items():
        assert main([*argv, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("plait plot: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "x.png").exists()
