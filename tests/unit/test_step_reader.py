"""The training loop reads each launched step once the next one is launched, and at once before a log, an
evaluation or a save (qwen_trainer.readback.StepReader)."""

from __future__ import annotations

from qwen_trainer.readback import StepReader


def test_each_step_is_read_once_after_the_next_launch_or_a_flush():
    events: list[str] = []
    reader = StepReader(lambda it, lr, step: events.append(f"read {it} {lr} {step}"))
    for it in range(1, 6):
        events.append(f"launch {it}")
        reader.launched(it, it / 10, f"s{it}")
        if it == 3:  # a save after step 3
            reader.flush()
            events.append("save 3")
    reader.flush()
    reader.flush()  # nothing left: reads nothing twice
    assert events == ["launch 1", "launch 2", "read 1 0.1 s1", "launch 3", "read 2 0.2 s2", "read 3 0.3 s3",
                      "save 3", "launch 4", "launch 5", "read 4 0.4 s4", "read 5 0.5 s5"]
