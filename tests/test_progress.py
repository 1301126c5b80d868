"""The progress printer: bounded output in logs, first and last step always shown."""
import io

from ntkfast.core.progress import Progress


def test_log_output_is_bounded_and_keeps_first_and_last():
    buf = io.StringIO()
    bar = Progress(100, "prune", stream=buf)
    for i in range(100):
        bar.update(density=1.0 - i / 100)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert 15 <= len(lines) <= 25
    assert lines[0].startswith("prune [1/100]") and lines[-1].startswith("prune [100/100]")


def test_short_loops_print_every_step_and_disabled_prints_nothing():
    buf = io.StringIO()
    bar = Progress(3, "train", stream=buf)
    for _ in range(3):
        bar.update(loss=0.5)
    assert len(buf.getvalue().splitlines()) == 3
    quiet = io.StringIO()
    off = Progress(3, "train", enabled=False, stream=quiet)
    off.update()
    off.close()
    assert quiet.getvalue() == ""
