"""Live progress from a run folder, and the per-round metrics in TensorBoard."""

import io
import json
import time

from flowertune_nlp.config import build_config
from flowertune_nlp.io import atomic_write_text
from flowertune_nlp.outputs import RunOutputs
from flowertune_nlp.progress import ProgressWatcher, progress_line

ROWS = [{"round": 1, "train_loss": 2.5, "comm_mb_total": 1.5},
        {"round": 2, "train_loss": 2.25, "heldout_loss": 2.125, "comm_mb_total": 3.0}]


def test_the_line_says_round_losses_communication_and_time_left():
    line = progress_line(ROWS, 10, elapsed=100.0)
    assert line == "round 2/10 · train loss 2.2500 · held-out 2.1250 · 3.0 MB · 6m40s left"
    # a resumed run extrapolates only the rounds it ran itself: 1 round in 100 s, 8 left
    assert progress_line(ROWS, 10, elapsed=100.0, rounds_before=1).endswith("13m20s left")
    assert progress_line(ROWS, 2, elapsed=5.0).endswith("done")
    assert "waiting" in progress_line([], 10, elapsed=1.0)


def test_the_watcher_prints_a_plain_line_per_finished_round(tmp_path):
    stream = io.StringIO()  # not a terminal
    with ProgressWatcher(tmp_path, 3, stream=stream, prefix="[m] ", interval=0.05):
        for i in range(2):
            atomic_write_text(tmp_path / "metrics.jsonl",
                              "".join(json.dumps(r) + "\n" for r in ROWS[:i + 1]))
            time.sleep(0.3)
    lines = stream.getvalue().splitlines()
    assert [line.split(" · ")[0] for line in lines] == ["[m] round 1/3", "[m] round 2/3"]


def test_tensorboard_event_files_hold_the_rounds(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = build_config({"run.tensorboard": True, "output-dir": str(tmp_path),
                           "run-name": "tb"})
    outputs = RunOutputs.create(config)
    for row in ROWS:
        outputs.append_metrics(row)
    outputs.finish("completed")
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train_loss")] == [(1, 2.5), (2, 2.25)]
    assert [e.step for e in events.Scalars("heldout_loss")] == [2]


def test_tensorboard_is_off_by_default(tmp_path):
    outputs = RunOutputs.create(build_config({"output-dir": str(tmp_path), "run-name": "x"}))
    outputs.append_metrics(ROWS[0])
    assert not (tmp_path / "x" / "tensorboard").exists()
