"""metrics.jsonl and TensorBoard across a crash and a resume: nothing the resumed run keeps is lost."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from openmill.train.metrics import MetricsLog, read_metrics


def log_steps(folder, steps, resume_step=None):
    with MetricsLog(folder, enabled=True, tensorboard=True, resume_step=resume_step) as metrics:
        for step in steps:
            metrics.log(step, loss=10.0 - step)


def test_resume_keeps_the_checkpoint_step_and_drops_a_torn_last_line(tmp_path):
    log_steps(tmp_path, range(1, 7))
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # the process died while writing step 7
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    log_steps(tmp_path, range(5, 9), resume_step=4)  # resumed from the step-4 checkpoint
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 9))
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == list(range(1, 9))  # step 4 included


def test_a_bad_line_before_the_last_names_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not a JSON metrics record"):
        read_metrics(path)
