"""Progress fields for status.progress: percentage, elapsed time and the remaining-time estimate."""

from __future__ import annotations

from qwen_trainer.progress import duration, progress_fields, summary


def test_estimate_uses_this_runs_mean_step_time():
    # resumed at 100 of 1000, 50 steps in 25 s: 850 steps left at 0.5 s
    got = progress_fields(150, 1000, started=1000.0, now=1025.0, start_iteration=100)
    assert got == {"percentage": 15.0, "elapsedSeconds": 25, "estimatedRemainingSeconds": 425}


def test_no_estimate_before_the_first_step_and_none_left_at_the_end():
    assert "estimatedRemainingSeconds" not in progress_fields(10, 100, 0.0, 5.0, start_iteration=10)
    end = progress_fields(100, 100, 0.0, 50.0, start_iteration=0)
    assert end["percentage"] == 100.0 and end["estimatedRemainingSeconds"] == 0


def test_summary_line():
    fields = progress_fields(120, 1000, 0.0, 120.0 * 3.5, start_iteration=0)  # 3.5 s a step, 880 left
    assert summary(120, 1000, 3.21404, fields) == "120/1000 (12.0%) loss 3.2140 ETA 51m20s"
    assert summary(1000, 1000, 2.0, progress_fields(1000, 1000, 0.0, 10.0, 0)) == "1000/1000 (100.0%) loss 2.0000"
    assert [duration(s) for s in (45, 750, 3900, None)] == ["45s", "12m30s", "1h05m", "?"]
