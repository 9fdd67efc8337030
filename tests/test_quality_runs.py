"""The quality tools' image loop (apt_dense.quality_runs): skipped images, Ctrl-C, exit statuses."""
import numpy as np

from apt_dense.quality_runs import compare_images, write_and_exit_status

IMAGE = np.zeros((4, 4, 3), np.uint8)


def test_results_skips_and_progress_lines(capsys):
    images = [("a", IMAGE), ("b", IMAGE), ("c", IMAGE)]
    results, interrupted = compare_images(images, 3, lambda name, _: (None, "skipped") if name == "b" else (name, "ok"))
    assert (results, interrupted) == (["a", "c"], False)
    assert capsys.readouterr().out.splitlines() == ["[1/3] a: ok", "[2/3] b: skipped", "[3/3] c: ok"]


def test_ctrl_c_keeps_the_images_done(capsys):
    def images():
        yield "a", IMAGE
        raise KeyboardInterrupt

    results, interrupted = compare_images(images(), 2, lambda name, _: (name, "ok"))
    assert (results, interrupted) == (["a"], True)
    assert "writing the 1 images done so far" in capsys.readouterr().out
    assert write_and_exit_status(results, interrupted, lambda: "done") == 130


def test_exit_statuses(capsys):
    assert write_and_exit_status(["a"], False, lambda: "wrote it") == 0
    assert capsys.readouterr().out == "wrote it\n"
    assert write_and_exit_status([], False, lambda: "never") == 1
    assert "no image was compared" in capsys.readouterr().err
    assert write_and_exit_status([], True, lambda: "never") == 130

    def full_disk():
        raise OSError(28, "No space left on device")

    assert write_and_exit_status(["a"], False, full_disk) == 1
    assert "No space left on device" in capsys.readouterr().err
