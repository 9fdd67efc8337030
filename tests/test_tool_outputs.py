"""Nothing lost: every tool checks its output paths before it starts work, writes each file whole
or not at all (a full disk, an error or Ctrl-C leaves no partial file), and a second Ctrl-C while
results are written neither cuts them short nor prints a traceback (apt_dense.outputs)."""
import errno
import json
import os
import signal
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import apt_dense.outputs as outputs
from apt_dense.outputs import atomic_write, check_output_file, check_output_folder, ctrl_c_deferred

TOOLS = Path(__file__).resolve().parents[1] / "tools"
sys.path.insert(0, str(TOOLS))

import benchmark  # noqa: E402
import calibrate_thresholds  # noqa: E402
import convert_checkpoint  # noqa: E402
import demo  # noqa: E402
import fidelity_probe  # noqa: E402
import make_tiny_ade20k  # noqa: E402
import make_tiny_coco  # noqa: E402
import visualize_patches  # noqa: E402
from test_tools import interrupted_on_third  # noqa: E402


def leftovers(folder: Path) -> list[str]:
    """Temporary files of atomic_write left in ``folder`` (and below)."""
    return [p.name for p in folder.rglob(".*.tmp")]


@pytest.fixture
def full_disk(monkeypatch):
    """Every atomic write fails as on a full disk, after the data went to the temporary file."""
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(outputs.os, "fsync", no_space)


@pytest.fixture
def read_only(monkeypatch):
    """Folders under the returned path cannot be written (root ignores chmod, so os.access is
    what the check asks, as for a read-only mount)."""
    def make(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        real_access = os.access
        monkeypatch.setattr(outputs.os, "access",
                            lambda path, mode: False if Path(path) == folder and mode & os.W_OK else real_access(path, mode))
        return folder

    return make


def usage_error(call, capsys) -> str:
    """The one-line error of a tool refusing its arguments (exit 2, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[-1]


# --- the shared helpers -------------------------------------------------------------------------


def test_check_output_file_finds_every_problem_before_work(tmp_path, read_only):
    (tmp_path / "a_file").write_text("x")
    cases = {
        tmp_path: "is a folder; give a file name in it",
        tmp_path / "sheet.xyz": "suffix '.xyz' is not supported; end it in one of .png, .jpg",
        tmp_path / "sheet": "has no suffix",
        tmp_path / "a_file" / "sheet.png": "a_file is a file, not a folder",
        read_only(tmp_path / "ro") / "sheet.png": "cannot write in",
    }
    for path, message in cases.items():
        with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
            check_output_file(path, suffixes=[".png", ".jpg"], what="--output")
    missing = tmp_path / "new" / "deeper" / "sheet.png"
    assert check_output_file(missing, suffixes=[".png"]) == missing
    assert not (tmp_path / "new").exists()  # created when written, not by the check
    with pytest.raises(ValueError, match="a_file is a file, not a folder"):
        check_output_folder(tmp_path / "a_file" / "results")
    assert check_output_folder(tmp_path / "results") == tmp_path / "results"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_output_file_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(ValueError, match="cannot write in"):
            check_output_file(folder / "x.json")
    finally:
        folder.chmod(stat.S_IRWXU)


def test_atomic_write_leaves_the_old_file_or_none(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "result.json"
    with atomic_write(target, "w") as f:
        f.write("old")
    assert target.read_text() == "old" and not leftovers(tmp_path)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()
    for failure in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt(), ValueError("bug")):
        with pytest.raises(type(failure)) as info:
            with atomic_write(target, "w") as f:
                f.write("new, half written")
                raise failure
        assert target.read_text() == "old" and not leftovers(tmp_path)
        if isinstance(failure, OSError):
            assert info.value.filename == str(target)  # the error names the file asked for
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_write(target, "a"):
            pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ctrl_c_is_held_back_while_results_are_written(capsys):
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_deferred() as ctrl_c:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        finished = True
    assert finished and ctrl_c.pressed
    assert capsys.readouterr().err.count("finishing the result files first") == 1
    assert signal.getsignal(signal.SIGINT) is before


def sigint_during(monkeypatch, owner, name: str) -> None:
    """``owner.name`` sends this process Ctrl-C before doing its work, as a user pressing it
    while a result file is written; refuses when nothing would catch it (pytest would stop)."""
    real = getattr(owner, name)

    def pressed(*args, **kwargs):
        assert signal.getsignal(signal.SIGINT) is not signal.default_int_handler, "Ctrl-C is not held back here"
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, pressed)


# --- visualize_patches ----------------------------------------------------------------------------


@pytest.mark.parametrize("output, message", [
    ("{tmp}", "is a folder"),
    ("{tmp}/sheet.svg", "suffix '.svg' is not supported"),
    ("{tmp}/a_file/sheet.png", "is a file, not a folder"),
    ("{tmp}/csv_folder.png", "--output (its CSV)"),
])
def test_visualize_checks_its_outputs_before_reading_images(tmp_path, monkeypatch, capsys, output, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "csv_folder.csv").mkdir()
    monkeypatch.setattr(visualize_patches, "host_image", lambda *a, **k: pytest.fail("read an image"))
    line = usage_error(lambda: visualize_patches.main(["--size", "256", "--output", output.format(tmp=tmp_path)]), capsys)
    assert message in line


def test_visualize_full_disk_leaves_no_partial_file(tmp_path, full_disk, capsys):
    out = tmp_path / "sheet.png"
    assert visualize_patches.main(["--size", "128", "--limit", "2", "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"error: cannot write {out}: No space left on device" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_visualize_second_ctrl_c_while_writing_keeps_whole_files(tmp_path, monkeypatch, capsys):
    interrupted_on_third(monkeypatch, visualize_patches)
    sigint_during(monkeypatch, Image.Image, "save")
    out = tmp_path / "sheet.png"
    assert visualize_patches.main(["--size", "128", "--output", str(out)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "finishing the result files first" in captured.err
    with Image.open(out) as sheet:
        sheet.load()  # a truncated PNG fails here
    assert len((tmp_path / "sheet.csv").read_text().splitlines()) == 1 + 2 and not leftovers(tmp_path)


# --- calibrate_thresholds ------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--curve", "{tmp}/curve.xyz"], "--curve: {tmp}/curve.xyz suffix '.xyz' is not supported"),
    (["--curve", "{tmp}"], "is a folder"),
    (["--output", "{tmp}/a_file/cal.json"], "a_file is a file, not a folder"),
])
def test_calibrate_checks_its_outputs_before_scoring(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "a_file").write_text("x")
    monkeypatch.setattr(calibrate_thresholds, "host_image", lambda *a, **k: pytest.fail("scored an image"))
    argv = [a.format(tmp=tmp_path) for a in ["--target", "0.8", "--output", str(tmp_path / "cal.json"), *argv]]
    assert message.format(tmp=tmp_path) in usage_error(lambda: calibrate_thresholds.main(argv), capsys)
    assert not (tmp_path / "cal.json").exists()


def test_calibrate_full_disk_leaves_no_partial_file(tmp_path, full_disk, capsys):
    out = tmp_path / "cal.json"
    assert calibrate_thresholds.main(["--size", "128", "--target", "0.8", "--curve", str(tmp_path / "c.png"),
                                      "--output", str(out)]) == 1
    assert f"error: cannot write {out}: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_calibrate_second_ctrl_c_while_plotting_keeps_whole_files(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    interrupted_on_third(monkeypatch, calibrate_thresholds)
    sigint_during(monkeypatch, Figure, "savefig")
    out, png = tmp_path / "cal.json", tmp_path / "curve.png"
    assert calibrate_thresholds.main(["--size", "128", "--target", "0.8", "--curve", str(png), "--output", str(out)]) == 130
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "finishing the result files first" in captured.err
    assert json.loads(out.read_text())["images"] == 2
    with Image.open(png) as curve:
        curve.load()
    assert not leftovers(tmp_path)


# --- benchmark ------------------------------------------------------------------------------------

TINY_BENCHMARK = ["--size", "64", "--depth", "1", "--repeats", "1", "--warmup", "0", "--scales", "0", "--limit", "2"]


@pytest.mark.parametrize("argv, message", [
    (["--output-dir", "{tmp}/a_file"], "--output-dir: {tmp}/a_file is a file, not a folder"),
    (["--output-dir", "{tmp}/a_file/results"], "is a file, not a folder"),
    (["--output-dir", "{tmp}", "--tag", "sub/run"], "--tag 'sub/run': a file name without folders"),
    (["--output-dir", "{tmp}", "--tag", "taken"], "taken.json is a folder"),
])
def test_benchmark_checks_its_outputs_before_measuring(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken.json").mkdir()
    monkeypatch.setattr(benchmark, "times_side_by_side", lambda *a, **k: pytest.fail("measured"))
    argv = TINY_BENCHMARK + [a.format(tmp=tmp_path) for a in argv]
    assert message.format(tmp=tmp_path) in usage_error(lambda: benchmark.main(argv), capsys)


def test_benchmark_tags_with_dots_keep_runs_apart_and_report_real_files(tmp_path, capsys):
    paths = {tag: benchmark.result_paths(benchmark.parse_args(["--output-dir", str(tmp_path), "--tag", tag]))
             for tag in ("run.1", "run.2")}
    assert paths["run.1"]["json"] == tmp_path / "run.1.json" and paths["run.2"]["png"] == tmp_path / "run.2.png"
    assert benchmark.main(TINY_BENCHMARK + ["--output-dir", str(tmp_path), "--tag", "run.1"]) == 0
    printed = capsys.readouterr().out
    written = printed.split("wrote ")[-1].strip().split(", ")
    assert written == [str(paths["run.1"][kind]) for kind in ("json", "md", "png")]
    assert all(Path(p).is_file() for p in written) and not (tmp_path / "run.json").exists()
    row = json.loads(paths["run.1"]["json"].read_text())["rows"][0]
    # Peak memory of each side, for inference and for a training step (CPU: the process's RSS).
    for key in ("peak_mib_dense", "peak_mib_apt", "train_peak_mib_dense", "train_peak_mib_apt"):
        start = row[key.replace("peak", "start")]
        assert row[key] >= start > 50, key  # the process's RSS when the side started, and its peak
    table = paths["run.1"]["md"].read_text()
    assert "| inference peak MiB (added) dense/APT | train step peak MiB (added) dense/APT |" in table
    assert f"| {row['peak_mib_dense']:.0f} (+{row['peak_mib_dense'] - row['start_mib_dense']:.0f})/" in table


def test_benchmark_full_disk_leaves_no_partial_file(tmp_path, full_disk, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, "memory_columns", lambda *args: {})  # measured in the test above
    assert benchmark.main(TINY_BENCHMARK + ["--output-dir", str(tmp_path), "--tag", "run"]) == 1
    assert f"error: cannot write {tmp_path / 'run.json'}: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_peak_memory_is_measured_per_call():
    from apt_dense.benchmarking import peak_memory_mib

    cpu = torch.device("cpu")
    big = peak_memory_mib(lambda: torch.ones(300 * 2**20 // 4).sum(), cpu)
    small = peak_memory_mib(lambda: torch.ones(10).sum(), cpu)
    assert big is not None and small is not None
    assert big.peak - big.start > 250 and small.peak - small.start < 50
    assert big.peak - small.peak > 250  # the high-water mark was reset between the two


@pytest.mark.slow
def test_benchmark_measures_memory_in_fresh_processes_without_clear_refs(tmp_path, monkeypatch):
    """Where the high-water mark cannot be reset, each side runs alone in a new process."""
    monkeypatch.setattr(benchmark, "peak_memory_mib", lambda fn, device: None)
    assert benchmark.main(TINY_BENCHMARK + ["--output-dir", str(tmp_path), "--tag", "fresh"]) == 0
    row = json.loads((tmp_path / "fresh.json").read_text())["rows"][0]
    for key in ("peak_mib_dense", "peak_mib_apt", "train_peak_mib_dense", "train_peak_mib_apt"):
        assert row[key] > 50, key


# --- fidelity_probe, demo, convert_checkpoint, make_tiny_* ------------------------------------------


def test_fidelity_probe_checks_output_and_survives_a_full_disk(tmp_path, full_disk, capsys):
    assert "--output: {} is a folder".format(tmp_path) in usage_error(
        lambda: fidelity_probe.main(["--size", "128", "--depth", "1", "--output", str(tmp_path)]), capsys)
    out = tmp_path / "fid.json"
    assert fidelity_probe.main(["--size", "128", "--depth", "1", "--limit", "1", "--output", str(out)]) == 1
    assert f"error: cannot write {out}: No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_demo_checks_its_picture_before_work_and_survives_a_full_disk(tmp_path, monkeypatch, full_disk, capsys):
    assert "suffix '.gif' is not supported" in usage_error(
        lambda: demo.main(["--size", "128", "--output", str(tmp_path / "map.gif")]), capsys)
    monkeypatch.setattr(demo, "build_models", lambda args: pytest.fail("went on after the picture failed"))
    assert demo.main(["--size", "128", "--output", str(tmp_path / "map.png")]) == 1
    assert "No space left on device" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def pretraining_checkpoint(tmp_path):
    path = tmp_path / "pt.pt"
    torch.save({"module": {f"blocks.0.w{i}": torch.randn(4, 4) for i in range(2)}}, path)
    return path


def test_convert_checkpoint_checks_the_target_before_reading(tmp_path, monkeypatch, pretraining_checkpoint, read_only, capsys):
    monkeypatch.setattr(convert_checkpoint, "read_checkpoint", lambda *a, **k: pytest.fail("read the source"))
    source = str(pretraining_checkpoint)
    (tmp_path / "a_file").write_text("x")
    for target, message in [(tmp_path, "is a folder"), (tmp_path / "a_file" / "out.pth", "is a file, not a folder"),
                            (read_only(tmp_path / "ro") / "out.pth", "cannot write in"),
                            (pretraining_checkpoint, "is the source"),
                            (tmp_path / "out.txt", "suffix '.txt' is not supported; end it in one of .pth, .pt")]:
        assert message in usage_error(lambda: convert_checkpoint.main([source, str(target)]), capsys)


def test_convert_checkpoint_full_disk_keeps_the_old_target(tmp_path, pretraining_checkpoint, monkeypatch, capsys):
    target = tmp_path / "out.pth"
    target.write_bytes(b"previous conversion")

    def partial_save(obj, f):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(convert_checkpoint.torch, "save", partial_save)
    assert convert_checkpoint.main([str(pretraining_checkpoint), str(target)]) == 1
    err = capsys.readouterr().err
    assert err == f"convert_checkpoint: cannot write {target}: No space left on device\n"
    assert target.read_bytes() == b"previous conversion" and not leftovers(tmp_path)


def test_convert_checkpoint_takes_arrays_and_refuses_other_values(tmp_path, capsys):
    arrays, others, target = tmp_path / "arrays.pt", tmp_path / "others.pt", tmp_path / "out.pth"
    torch.save({"module": {"blocks.0.w": torch.ones(2), "blocks.0.a": np.arange(3.0)}}, arrays)
    assert convert_checkpoint.main([str(arrays), str(target)]) == 0
    converted = torch.load(target, weights_only=True)["model"]
    assert torch.equal(converted["backbone.net.blocks.0.a"], torch.arange(3.0, dtype=torch.float64))
    assert "wrote 2 tensors" in capsys.readouterr().out
    target.unlink()
    torch.save({"module": {"blocks.0.w": torch.ones(2), "blocks.0.n": 3, "blocks.0.s": "x"}}, others)
    assert convert_checkpoint.main([str(others), str(target)]) == 1
    err = capsys.readouterr().err
    assert "state dict entry 'backbone.net.blocks.0.n' is a int ('3'), not a tensor or numpy array" in err
    assert not target.exists()


def test_convert_checkpoint_source_folder_is_a_clear_error(tmp_path, capsys):
    assert convert_checkpoint.main([str(tmp_path), str(tmp_path / "out.pth")]) == 1
    assert f"checkpoint {tmp_path} is a folder; give the checkpoint file in it" in capsys.readouterr().err


@pytest.mark.parametrize("tool", [make_tiny_ade20k, make_tiny_coco])
def test_make_tiny_interrupted_half_way_leaves_the_folder_as_it_was(tool, tmp_path, monkeypatch, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    written = []

    def save_then_ctrl_c(picture, path, **kwargs):
        if len(written) == 3:
            raise KeyboardInterrupt
        written.append(path)
        picture.save(path)

    monkeypatch.setattr(tool, "save_picture", save_then_ctrl_c)
    assert tool.main([str(out), "--size", "64"]) == 130
    assert "interrupted: nothing written" in capsys.readouterr().err
    assert written and sorted(p.name for p in out.rglob("*")) == ["notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left


@pytest.mark.parametrize("tool", [make_tiny_ade20k, make_tiny_coco])
def test_make_tiny_checks_the_folder_and_survives_a_full_disk(tool, tmp_path, full_disk, capsys):
    (tmp_path / "a_file").write_text("x")
    assert "is a file, not a folder" in usage_error(lambda: tool.main([str(tmp_path / "a_file" / "data")]), capsys)
    out = tmp_path / "data"
    assert tool.main([str(out), "--size", "64"]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert [p for p in out.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("tool, argv", [
    (visualize_patches, ["--output", ""]),
    (calibrate_thresholds, ["--target", "0.8", "--output", ""]),
    (calibrate_thresholds, ["--curve", " "]),
    (benchmark, ["--output-dir", ""]),
    (fidelity_probe, ["--output", ""]),
    (demo, ["--output", ""]),
    (convert_checkpoint, ["source.pt", ""]),
    (make_tiny_ade20k, [""]),
    (make_tiny_coco, [""]),
])
def test_an_empty_output_path_is_not_the_current_folder(tool, argv, capsys):
    """An unset variable (``--output-dir $OUT``) must not write results into the current folder."""
    parse = getattr(tool, "parse_args", tool.main)
    assert "empty path; give a file or folder name" in usage_error(lambda: parse(argv), capsys)
