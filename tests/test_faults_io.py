"""Faults through the real command line: each ends with one line (no traceback) that names
the path, a non-zero exit, and leaves an earlier good output file unchanged.

Tests run as root, which ignores permission bits: a read-only folder cannot be made with
chmod. The file-system faults are a regular file where a folder is needed (ENOTDIR), a
folder where a file is needed (EISDIR), and a full disk (ENOSPC) raised by a patched
os.fsync, the last step before the atomic rename.
"""
import errno
import io
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from segadapt.cli import main

from .conftest import tiny_overrides


def one_line_error(capsys, code, *needles) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for n in needles:
        assert str(n) in lines[0], lines[0]
    assert "weights_only=False" not in lines[0]  # never advice to disable the safe loader
    assert ".tmp" not in lines[0] and ".partial" not in lines[0]  # the path the user gave, not a temporary
    return lines[0]


@pytest.fixture
def a_file(tmp_path):
    """A regular file standing where an output folder is wanted; must stay unchanged."""
    p = tmp_path / "notes.txt"
    p.write_text("keep me\n")
    return p


def full_disk(monkeypatch, only: str = ""):
    """fsync fails with ENOSPC (for files whose name holds `only`, when given)."""
    real = os.fsync

    def no_space(fd):
        if only and only not in os.readlink(f"/proc/self/fd/{fd}"):
            return real(fd)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)


def no_temp_files(folder):
    return not [p for p in folder.rglob(".*.tmp")]


# --------------------------------------------------------------------------- file system
@pytest.mark.parametrize("argv", [
    lambda run, data, f: ["test", str(run), "--no-progress", "--out", str(f)],
    lambda run, data, f: ["predict", str(data / "source" / "images"), "--checkpoint", str(run), "--out", str(f),
                          "--no-progress"],
    lambda run, data, f: ["export", str(run), "--format", "torchscript", "--out", str(f / "m.pt"),
                          "--size", "64", "32"],
    lambda run, data, f: ["report", str(run), "--out", str(f), "--samples", "0"],
    lambda run, data, f: ["synth", "--out", str(f / "bench"), "--num-source", "2", "--size", "32", "16"],
    lambda run, data, f: ["prepare", "--kind", "gta5", "--root", str(data / "source"), "--out", str(f / "s.json")],
    lambda run, data, f: ["adain-train", "--content-root", str(data / "source" / "images"), "--style-root",
                          str(data / "source" / "images"), "--out", str(f / "d.pth")],
    lambda run, data, f: ["stylize", "--data-kind", "folder", "--root", str(data / "source" / "images"),
                          "--out", str(f / "st"), "--decoder", "d.pth", "--style-dir", str(data / "source")],
], ids=["test", "predict", "export", "report", "synth", "prepare", "adain-train", "stylize"])
def test_output_under_a_file_is_one_line(argv, tiny_run, tiny_synth, a_file, capsys):
    code = main(argv(tiny_run, tiny_synth, a_file))
    one_line_error(capsys, code, "cannot write", str(a_file), "Not a directory")
    assert a_file.read_text() == "keep me\n"


def test_train_out_dir_is_a_file(tiny_synth, a_file, capsys):
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, a_file)])
    one_line_error(capsys, code, "cannot write", str(a_file))
    assert a_file.read_text() == "keep me\n"


def test_train_checkpoint_path_is_a_folder_fails_before_training(tiny_synth, tmp_path, capsys):
    (tmp_path / "run" / "final.pth").mkdir(parents=True)
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, tmp_path / "run")])
    one_line_error(capsys, code, "cannot write", str(tmp_path / "run" / "final.pth"), "Is a directory")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final.pth"]  # no iteration was run


def test_output_file_is_a_folder(tiny_run, tmp_path, capsys):
    (tmp_path / "t" / "results.json").mkdir(parents=True)
    code = main(["test", str(tiny_run), "--no-progress", "--out", str(tmp_path / "t")])
    one_line_error(capsys, code, "cannot write", str(tmp_path / "t" / "results.json"), "Is a directory")
    code = main(["export", str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "t"),
                 "--size", "64", "32"])
    one_line_error(capsys, code, "cannot write", str(tmp_path / "t"), "Is a directory")
    code = main(["prepare", "--kind", "gta5", "--root", str(tmp_path), "--out", str(tmp_path / "t")])
    one_line_error(capsys, code, "cannot write", str(tmp_path / "t"), "Is a directory")


def test_full_disk_keeps_the_earlier_predictions(tiny_run, tiny_synth, tmp_path, monkeypatch, capsys):
    image = tmp_path / "x.png"
    shutil.copy(next((tiny_synth / "target" / "leftImg8bit" / "val").rglob("*.png")), image)
    out = tmp_path / "pred"
    assert main(["predict", str(image), "--checkpoint", str(tiny_run), "--out", str(out), "--no-progress"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "x_trainid.png" in before
    capsys.readouterr()
    full_disk(monkeypatch)
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(image)  # another prediction would differ
    code = main(["predict", str(image), "--checkpoint", str(tiny_run), "--out", str(out), "--no-progress"])
    one_line_error(capsys, code, "cannot write", str(out / "x_"), "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # unchanged, no temporary left


def test_full_disk_at_a_checkpoint_is_one_line(tiny_synth, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    full_disk(monkeypatch, only="last.pth")
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, out, **{"train.iters": 2,
                                                                                "train.ckpt_every": 1})])
    one_line_error(capsys, code, "cannot write", str(out / "last.pth"), "No space left on device")
    assert not (out / "last.pth").exists() and no_temp_files(out)


def test_full_disk_at_the_results_names_the_files(tiny_run, tmp_path, monkeypatch, capsys):
    full_disk(monkeypatch, only="results.")
    code = main(["test", str(tiny_run), "--no-progress", "--out", str(tmp_path / "t")])
    one_line_error(capsys, code, "cannot write", str(tmp_path / "t" / "results."), "No space left on device")


def test_full_disk_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    from segadapt.utils.checkpoint import atomic_save
    from segadapt.errors import OutputError

    path = tmp_path / "last.pth"
    atomic_save({"iteration": 1}, path)
    good = path.read_bytes()
    full_disk(monkeypatch)
    with pytest.raises(OutputError, match=f"cannot write {path}: No space left on device"):
        atomic_save({"iteration": 2}, path)
    assert path.read_bytes() == good and no_temp_files(tmp_path)


# --------------------------------------------------------------------------- bad input files
def test_config_not_utf8(tmp_path, capsys):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("name: caf\xe9\n".encode("latin-1"))
    code = main(["train", "-c", str(cfg)])
    one_line_error(capsys, code, str(cfg), "not UTF-8", "0xe9")


@pytest.fixture
def bad_checkpoints(tiny_run, tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    (d / "empty.pth").write_bytes(b"")
    (d / "garbage.pth").write_bytes(bytes(range(256)) * 8)
    torch.save({"lr": 0.1, "note": "no tensors"}, d / "no_tensors.pth")
    ckpt = torch.load(tiny_run / "final.pth", map_location="cpu", weights_only=False)
    ckpt["model"] = dict(ckpt["model"], **{"conv1.weight": torch.zeros(4, 3, 3, 3)})
    ckpt.pop("eval_model", None)
    torch.save(ckpt, d / "wrong_shapes.pth")
    return d


@pytest.mark.parametrize("name, needles", [
    ("empty.pth", ["empty file"]),
    ("garbage.pth", ["not a readable PyTorch file"]),
    ("no_tensors.pth", ["not a model state dict", "lr"]),
    ("wrong_shapes.pth", ["conv1.weight", "(4, 3, 3, 3)", "(8, 3, 7, 7)"]),
])
def test_bad_checkpoint_is_one_line(name, needles, bad_checkpoints, tiny_synth, tmp_path, capsys):
    path = bad_checkpoints / name
    cfg = [] if name == "wrong_shapes.pth" else ["-c", "synthetic/source_only"]
    overrides = tiny_overrides(tiny_synth, tmp_path / "r") if cfg else []
    code = main(["test", str(path), "--no-progress", "--out", str(tmp_path / "t"), *cfg, *overrides])
    one_line_error(capsys, code, str(path), *needles)
    image = next((tiny_synth / "source" / "images").glob("*.png"))
    code = main(["predict", str(image), "--checkpoint", str(path), "--out", str(tmp_path / "p"), "--no-progress",
                 *cfg])
    one_line_error(capsys, code, str(path), *needles)


def test_resume_from_an_empty_checkpoint(tiny_synth, bad_checkpoints, tmp_path, capsys):
    path = bad_checkpoints / "empty.pth"
    code = main(["train", "--no-progress", "--resume", str(path), *tiny_overrides(tiny_synth, tmp_path / "r")])
    one_line_error(capsys, code, str(path), "empty file")


def test_pickled_object_is_refused_without_unsafe_advice(tmp_path):
    from segadapt.errors import CheckpointError
    from segadapt.models.checkpoints import read_checkpoint

    path = tmp_path / "obj.pth"
    torch.save({"model": {}, "extra": io.StringIO("x")}, path)
    with pytest.raises(CheckpointError, match=r"_io.StringIO.*safe loader refuses") as ei:
        read_checkpoint(path)
    assert "weights_only=False" not in str(ei.value) and str(path) in str(ei.value)


# --------------------------------------------------------------------------- checks that check
@pytest.fixture
def target_copy(tiny_synth, tmp_path):
    root = tmp_path / "target"
    shutil.copytree(tiny_synth / "target", root)
    return root


def _prepare_check(root, capsys):
    code = main(["prepare", "--kind", "cityscapes", "--root", str(root), "--split", "val", "--check",
                 "--no-progress", "--workers", "0"])
    return code, capsys.readouterr().out


def test_prepare_check_decodes_images_in_full(target_copy, capsys):
    image = sorted((target_copy / "leftImg8bit" / "val").rglob("*.png"))[1]
    data = image.read_bytes()
    image.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data cut
    code, out = _prepare_check(target_copy, capsys)
    assert code == 2
    assert "unreadable (1)" in out and image.relative_to(target_copy).as_posix() in out and "truncated" in out


def test_prepare_check_flags_lossy_labels(target_copy, capsys):
    code, out = _prepare_check(target_copy, capsys)
    assert code == 0 and "problems: none" in out  # the clean labels pass
    labels = sorted((target_copy / "gtFine" / "val").rglob("*_labelIds.png"))
    ids = np.asarray(Image.open(labels[0]))
    Image.fromarray(ids).save(labels[0], format="JPEG", quality=95)  # JPEG bytes behind a .png name
    buf = io.BytesIO()
    Image.fromarray(np.asarray(Image.open(labels[1]))).save(buf, format="JPEG", quality=90)
    Image.open(buf).save(labels[1], format="PNG")  # once JPEG-compressed, now a PNG
    code, out = _prepare_check(target_copy, capsys)
    assert code == 2 and "lossy label (2)" in out, out
    assert "is a JPEG file" in out and "intermediate id" in out
    for lab in labels[:2]:
        assert lab.relative_to(target_copy).as_posix() in out


def test_lossy_rule_on_hand_made_maps(tmp_path):
    from segadapt.commands.prepare import lossy_label_reason

    path = tmp_path / "l.png"
    path.write_bytes(b"\x89PNG")  # only the magic bytes are read
    clean = np.zeros((40, 40), np.uint8)
    clean[:, 20:] = 10  # one vertical edge 0 -> 10: no intermediate ids
    assert lossy_label_reason(path, clean) is None
    blended = clean.copy()
    blended[:, 19], blended[:, 20] = 3, 7  # every row passes 0 -> 3 -> 7 -> 10
    # per row: 4 runs with differing ends, 2 of them blended; 80 blended pixels in all
    assert lossy_label_reason(path, blended) is None  # 100 blended pixels needed
    assert "intermediate id" in lossy_label_reason(path, np.tile(blended, (2, 1)))  # 160 >= 100, 50% >= 15%


@pytest.mark.parametrize("override, needles", [
    ("train.num_workers=-1", ["train.num_workers", ">= 0", "-1"]),
    ("train.eval_every=-5", ["train.eval_every", ">= 0"]),
    ("eval.batch_size=0", ["eval.batch_size", "positive"]),
    ("synthetic.num_target_val=0", ["synthetic.num_target_val", "positive"]),
    ("eval.scales=[1.0,-0.5]", ["eval.scales"]),
    ("name=${name}", ["reference cycle ${name} -> ${name}"]),
    ("name=a${out_dir}", ["reference cycle", "${out_dir}", "${name}"]),
    ("name=${train}", ["${train} is a section, not a value"]),
])
def test_bad_counts_and_reference_cycles(override, needles, tiny_synth, tmp_path, capsys):
    args = tiny_overrides(tiny_synth, tmp_path / "run")
    if "${out_dir}" in override:
        args = [a for a in args if not a.startswith("out_dir=")] + ["out_dir=runs/${name}"]
    code = main(["train", "--no-progress", *args, override])
    one_line_error(capsys, code, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, needles", [
    (lambda run, img: ["predict", img, "--checkpoint", run, "--out", "p", "--mode", "slide", "--crop", "0", "0"],
     ["--crop", "[0, 0]"]),
    (lambda run, img: ["predict", img, "--checkpoint", run, "--out", "p", "--mode", "slide", "--crop", "32", "32",
                       "--stride", "0", "8"], ["--stride", "[0, 8]"]),
    (lambda run, img: ["report", run, "--out", "r", "--samples", "-1"], ["--samples", "-1"]),
    (lambda run, img: ["adain-train", "--content-root", img, "--style-root", img, "--out", "d.pth",
                       "--workers", "-1"], ["--workers", "-1"]),
    (lambda run, img: ["adain-train", "--content-root", img, "--style-root", img, "--out", "d.pth",
                       "--lr-decay", "-1"], ["--lr-decay", "-1.0"]),
], ids=["predict-crop", "predict-stride", "report-samples", "adain-workers", "adain-lr-decay"])
def test_bad_command_counts(argv, needles, tiny_run, tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    image = str(next((tiny_synth / "source" / "images").glob("*.png")))
    code = main(argv(str(tiny_run), image) + ["--no-progress"] * ("report" not in argv("", "")[0]))
    one_line_error(capsys, code, *needles)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_mixed_sizes_in_one_batch_name_the_files(tiny_synth, tmp_path, capsys):
    bench = tmp_path / "bench"
    shutil.copytree(tiny_synth, bench)
    odd = sorted((bench / "source" / "images").glob("*.png"))[0]
    Image.open(odd).resize((80, 40)).save(odd)
    label = bench / "source" / "labels" / odd.name
    Image.open(label).resize((80, 40), Image.NEAREST).save(label)
    code = main(["train", "--no-progress", *tiny_overrides(bench, tmp_path / "run", **{
        "train.batch_source": 16, "train.iters": 1})])
    line = one_line_error(capsys, code, "images in one batch differ in size", f"{odd} is 80x40", "is 64x32",
                          "crop")
    assert line.count(" is ") == 2


# --------------------------------------------------------------------------- a real full disk
@pytest.fixture
def small_tmpfs(tmp_path):
    """Factory: a real tmpfs of `size` (mount's syntax: 2m, 3000k) under tmp_path. Skips where
    mounting is not allowed (not root, no CAP_SYS_ADMIN, no mount command)."""
    import subprocess

    mounted = []

    def make(size: str):
        folder = tmp_path / f"tmpfs{len(mounted)}"
        folder.mkdir()
        if shutil.which("mount") is None:
            pytest.skip("no mount command: the real full-disk case needs a small tmpfs")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip() or 'not permitted'})")
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False, capture_output=True)


def fill(folder, leave: int) -> None:
    """Fill the file system of `folder` until about `leave` bytes are free."""
    st = os.statvfs(folder)
    free = st.f_bavail * st.f_frsize
    with open(folder / "filler", "ab") as f:  # added to: rewriting would free the old filler first
        f.write(b"\0" * max(0, free - leave))


def test_real_full_disk_at_a_checkpoint_keeps_the_earlier_one(tiny_synth, tiny_run, small_tmpfs, capsys):
    size = (tiny_run / "last.pth").stat().st_size
    # room for one checkpoint and the run's records, not for the second checkpoint's temporary file
    disk = small_tmpfs(f"{size * 3 // 2 // 1024}k")
    out = disk / "run"
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, out, **{"train.iters": 6,
                                                                                "train.ckpt_every": 3})])
    line = one_line_error(capsys, code, f"cannot write {out / 'last.pth'}: No space left on device",
                          "last good checkpoint", "(iteration 3)")
    assert "enforce fail" not in line
    assert torch.load(out / "last.pth", weights_only=False)["iteration"] == 3  # intact, loadable
    assert no_temp_files(out) and not (out / "final.pth").exists()


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_real_full_disk_at_an_export_is_one_line(fmt, tiny_run, small_tmpfs, capsys):
    if fmt == "onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxscript")
    disk = small_tmpfs("2m")
    out = disk / f"m.{fmt}"
    out.write_text("an earlier export\n")
    fill(disk, leave=200 * 1024)  # the tiny model's export is about 1 MB
    code = main(["export", str(tiny_run), "--format", fmt, "--out", str(out), "--size", "64", "32"])
    one_line_error(capsys, code, f"cannot write {out}: No space left on device")
    assert out.read_text() == "an earlier export\n"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", out.name]  # no .partial, no temporary


def _cli_with_file_size_limit(limit: int, argv: list):
    """`segadapt ARGV` in a child process whose files may not grow past `limit` bytes: writes fail
    with EFBIG (SIGXFSZ ignored), a real OS error met by every writer, no mount needed."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1])); "
            "from segadapt.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env,
                          timeout=300)


def _single_error_line(p, *needles) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_file_size_limit_at_a_checkpoint_keeps_the_earlier_one(tiny_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "last.pth").read_bytes()
    p = _cli_with_file_size_limit(100_000, ["train", "--no-progress", "--resume", str(run), "train.iters=3"])
    _single_error_line(p, f"cannot write {run / 'last.pth'}: File too large", "(iteration 2)")
    assert (run / "last.pth").read_bytes() == before and no_temp_files(run)


def test_file_size_limit_at_an_export_is_one_line(tiny_run, tmp_path):
    out = tmp_path / "m.pt"
    out.write_text("an earlier export\n")
    p = _cli_with_file_size_limit(100_000, ["export", str(tiny_run), "--format", "torchscript", "--out", str(out),
                                            "--size", "64", "32"])
    _single_error_line(p, f"cannot write {out}: File too large")
    assert out.read_text() == "an earlier export\n" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_training_on_jpeg_labels_warns_once_naming_a_file(tiny_synth, tmp_path):
    """JPEG bytes behind a .png name: training goes on (prepare --check is the full audit) but
    says so once, on one line, naming the file."""
    import subprocess
    import sys
    from pathlib import Path

    bench = tmp_path / "bench"
    shutil.copytree(tiny_synth, bench)
    labels = sorted((bench / "source" / "labels").glob("*.png"))
    for lab in labels:  # road over sidewalk: the compression blurs the edge, every id stays a Cityscapes id
        ids = np.full(np.asarray(Image.open(lab)).shape, 7, np.uint8)
        ids[ids.shape[0] // 2:] = 8
        Image.fromarray(ids).save(lab, format="JPEG", quality=95)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "segadapt", "train", "--no-progress",
                        *tiny_overrides(bench, tmp_path / "run", **{"train.iters": 2, "train.ckpt_every": 2})],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    warned = [ln for ln in p.stderr.splitlines() if "JPEG" in ln]
    assert len(warned) == 1 and warned[0].startswith("segadapt train: warning: "), p.stderr
    assert any(str(lab) in warned[0] for lab in labels) and "prepare --check" in warned[0]
    assert "Traceback" not in p.stderr and "UserWarning" not in p.stderr


def test_prepare_check_ends_with_its_verdict(target_copy, capsys):
    code, out = _prepare_check(target_copy, capsys)
    assert code == 0 and out.strip().splitlines()[-1].startswith("problems: none (4 images and 4 labels checked)")
    label = sorted((target_copy / "gtFine" / "val").rglob("*_labelIds.png"))[0]
    Image.fromarray(np.asarray(Image.open(label))).save(label, format="JPEG", quality=95)
    code = main(["prepare", "--kind", "cityscapes", "--root", str(target_copy), "--split", "val", "--check",
                 "--no-progress", "--workers", "0"])
    captured = capsys.readouterr()
    # the histogram first, the problems after it, the verdict last (alone on stderr)
    assert captured.out.index("class histogram") < captured.out.index("lossy label (1)")
    err = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, captured.err
    assert err[0].startswith("segadapt prepare: error: ") and "lossy label 1" in err[0] and "listed above" in err[0]


def test_real_full_disk_keeps_earlier_results_whole_and_names_the_output(tiny_run, tiny_synth, small_tmpfs, capsys):
    disk = small_tmpfs("2m")
    out = disk / "t"
    assert main(["test", str(tiny_run), "--no-progress", "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    fill(disk, leave=6000)  # room for one of the three files, not for the set
    code = main(["test", str(tiny_run), "--no-progress", "--out", str(out), "eval.max_images=2"])
    one_line_error(capsys, code, f"cannot write {out}/results.", "No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the earlier set, whole
    # the synthetic generator names its output folder, not a temporary one, and leaves nothing
    code = main(["synth", "--out", str(disk / "bench"), "--num-source", "4", "--num-source-val", "1",
                 "--num-target-train", "2", "--num-target-val", "1", "--size", "64", "32", "--workers", "1"])
    one_line_error(capsys, code, f"cannot write {disk / 'bench'}: No space left on device")
    # a run whose lock file cannot be written: one line, no folder left behind
    fill(disk, leave=0)
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, disk / "run")])
    one_line_error(capsys, code, f"cannot write {disk / 'run' / '.lock'}: No space left on device")
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "t"]


@pytest.mark.parametrize("extra, needles", [
    (["--size", "30000", "30000"], ["--size 30000 30000", "GiB of memory", "choose a smaller size"]),
    (["--size", "64", "32", "--tolerance", "-1"], ["--tolerance", "non-negative", "-1.0"]),
    (["--size", "64", "32", "--with-argmax", "--tolerance", "2"], ["--tolerance", "fraction of pixels in [0, 1]"]),
], ids=["huge-size", "negative-tolerance", "argmax-tolerance-above-1"])
def test_bad_export_options_are_one_line(extra, needles, tiny_run, tmp_path, capsys):
    code = main(["export", str(tiny_run), "--format", "torchscript", "--out", str(tmp_path / "m.pt"), *extra])
    one_line_error(capsys, code, *needles)
    assert list(tmp_path.iterdir()) == []


def test_export_out_naming_a_folder_is_one_line(tiny_run, tmp_path, capsys):
    code = main(["export", str(tiny_run), "--format", "torchscript", "--out", f"{tmp_path}/models/", "--size", "64",
                 "32"])
    one_line_error(capsys, code, "names a folder", f"{tmp_path}/models/model.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("opset, needles", [
    ("3", ["--opset 3", "could not convert this model to opset 3", "choose one from"]),
    ("99", ["--opset 99", "knows opsets 1 to"]),
])
def test_onnx_opset_the_exporter_cannot_make_is_one_line(opset, needles, tiny_run, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    code = main(["export", str(tiny_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--size", "64", "32",
                 "--opset", opset])
    one_line_error(capsys, code, *needles)  # not exit 0 with the converter's traceback and opset 18 inside
    assert list(tmp_path.iterdir()) == []


def test_real_full_disk_at_the_run_records_names_the_file(tiny_synth, small_tmpfs, capsys):
    disk = small_tmpfs("1m")
    fill(disk, leave=9000)  # tmpfs pages: the lock, config.yaml, then metrics.jsonl's first record fails
    out = disk / "run"
    code = main(["train", "--no-progress", *tiny_overrides(tiny_synth, out)])
    line = one_line_error(capsys, code, "cannot write", str(out), "No space left on device")
    assert line.split("cannot write ")[1].startswith(str(out / ""))  # names the file, not `cannot write:`
