"""A hostile user's inputs and faults: each ends in one clear line and its exit code, never a traceback or a wrong
result with exit 0; nothing is left half-written and the source is never touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reap_vlm.checkpoint.loading import load_model
from reap_vlm.checkpoint.reader import INDEX_NAME
from reap_vlm.errors import ReapError
from reap_vlm.score.job import run_reap
from reap_vlm.settings import Settings

ROUTER = "model.language_model.layers.1.mlp.gate.weight"


def settings(model, calib_file, out, **kw) -> Settings:
    base = dict(model_path=Path(model), calibration_path=Path(calib_file), output_path=Path(out), device="cpu",
                dtype="float32", prune_ratio=0.25, max_samples=100, resume=False)
    base.update(kw)
    return Settings(**base)


def copy_model(tiny_model: Path, folder: Path) -> Path:
    return Path(shutil.copytree(tiny_model, folder))


def shard_of(folder: Path, key: str) -> Path:
    return folder / json.loads((folder / INDEX_NAME).read_text())["weight_map"][key]


def rewrite_shard(folder: Path, key: str, change) -> None:
    """Apply ``change(tensors)`` to the shard holding ``key`` and keep the index in step."""
    shard = shard_of(folder, key)
    with safe_open(shard, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard.name or k in tensors}
    index["weight_map"].update({k: shard.name for k in tensors})
    (folder / INDEX_NAME).write_text(json.dumps(index))


# ----------------------------------------------------------------------------------------------- (1) the checkpoint

def test_other_weights_under_the_same_names_are_not_resumed(tiny_model, calibration, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    calib = calibration / "calibration_data.json"
    first = run_reap(settings(model, calib, tmp_path / "out", resume=True))
    generator = torch.Generator().manual_seed(1)
    rewrite_shard(model, ROUTER, lambda t: t.update({k: torch.randn(v.shape, generator=generator)
                                                     for k, v in t.items() if v.is_floating_point()}))
    again = run_reap(settings(model, calib, tmp_path / "out", resume=True))
    assert again["run"]["resumed_from"] == 0
    assert again["metrics"]["reap"] != first["metrics"]["reap"]


def test_a_missing_weight_is_never_initialised_at_random(tiny_model, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    rewrite_shard(model, ROUTER, lambda t: t.pop(ROUTER))
    with pytest.raises(ReapError, match=f"missing from the checkpoint .*{ROUTER}"):
        load_model(model)


# ----------------------------------------------------------------------------------------------- (2) preflight

def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(script: str, *argv: str, cwd: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """One of the three scripts in this process, run in ``cwd`` with no REAP_* variables and no .env."""
    import importlib
    import os

    from reap_vlm.cli import run_main

    monkeypatch.chdir(cwd)
    for name in [k for k in os.environ if k.startswith("REAP_")]:
        monkeypatch.delenv(name)
    main = importlib.import_module(script).main
    code = run_main(main, list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def truncate(folder: Path) -> str:
    shard = shard_of(folder, ROUTER)
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    return "is truncated"


def wrong_expert_count(folder: Path) -> str:
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_experts"] = 16
    (folder / "config.json").write_text(json.dumps(config))
    return "should have the 16 experts of config.json"


def no_router(folder: Path) -> str:
    rewrite_shard(folder, ROUTER, lambda t: t.pop(ROUTER))
    return "MoE layer 1 has no router weight"


def shard_gone(folder: Path) -> str:
    shard_of(folder, ROUTER).unlink()
    return "are missing; the download is incomplete"


def trailing_bytes(folder: Path) -> str:
    with open(shard_of(folder, ROUTER), "ab") as handle:
        handle.write(b"\0" * 64)
    return "64 bytes its header does not cover"


BROKEN = [truncate, wrong_expert_count, no_router, shard_gone, trailing_bytes]


@pytest.mark.parametrize("breakage", BROKEN, ids=lambda f: f.__name__)
def test_reap_refuses_a_broken_checkpoint_before_loading(tiny_model, calibration, tmp_path, monkeypatch, capsys,
                                                         breakage):
    import reap_vlm.score.job as score_job

    model = copy_model(tiny_model, tmp_path / "model")
    message = breakage(model)
    before = snapshot(model)
    monkeypatch.setattr(score_job, "load_calibration", lambda *a, **k: pytest.fail("read the calibration"))
    code, out, err = run_cli("reap", "--model", str(model), "--calibration",
                             str(calibration / "calibration_data.json"), "--output", "out", "--device", "cpu",
                             cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and message in err and err.startswith("error: ")
    assert not (tmp_path / "out").exists() and snapshot(model) == before


def hand_metadata(model: Path, folder: Path, keep: int = 8) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reap_metadata.json"
    path.write_text(json.dumps({"model_path": str(model), "num_experts": 12, "top_k": 4, "moe_layers": [0, 1, 2, 3],
                                "experts_to_keep": {str(layer): list(range(keep)) for layer in range(4)}}))
    return path


@pytest.mark.parametrize("breakage", BROKEN, ids=lambda f: f.__name__)
def test_prune_and_check_refuse_a_broken_checkpoint(tiny_model, tmp_path, monkeypatch, capsys, breakage):
    from reap_vlm.prune.rewrite import prune_checkpoint

    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, {layer: list(range(8)) for layer in range(4)}, progress=False)
    model = copy_model(tiny_model, tmp_path / "model")
    message = breakage(model)
    before = snapshot(model)
    code, out, err = run_cli("prune_model", "--model", str(model), "--metadata",
                             str(hand_metadata(model, tmp_path / "reap")), "--output", "pruned2", cwd=tmp_path,
                             monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: ") and not (tmp_path / "pruned2").exists()
    # the same checks on the original, before test_pruned_model.py loads anything
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--reference", str(model), "--output",
                             "report", "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.startswith("error: ") and not (tmp_path / "report").exists()
    if breakage is not wrong_expert_count:  # there, the original's expert count is refused first
        assert message in err
    assert snapshot(model) == before


def test_reap_output_preflight(tiny_model, calibration, tmp_path, monkeypatch, capsys):
    import reap_vlm.score.job as score_job

    monkeypatch.setattr(score_job, "load_calibration", lambda *a, **k: pytest.fail("read the calibration"))
    common = ("--model", str(tiny_model), "--calibration", str(calibration / "calibration_data.json"),
              "--device", "cpu")
    before = snapshot(tiny_model)
    (tmp_path / "a-file").write_text("x")
    for output, code_, message in ((tiny_model, 2, "is the model folder"),
                                   (tiny_model / "reap", 2, "is inside the model folder"),
                                   (tmp_path / "a-file", 2, "is a file, not a folder"),
                                   (tmp_path / "a-file" / "out", 2, "is a file, not a folder")):
        code, out, err = run_cli("reap", *common, "--output", str(output), cwd=tmp_path, monkeypatch=monkeypatch,
                                 capsys=capsys)
        assert (code, err.count("\n")) == (code_, 1) and message in err, err
    assert snapshot(tiny_model) == before
    with monkeypatch.context() as m:
        m.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
        code, out, err = run_cli("reap", *common, "--output", "out", cwd=tmp_path, monkeypatch=monkeypatch,
                                 capsys=capsys)
    assert code == 1 and "not enough disk space" in err and not (tmp_path / "out").exists()
    with monkeypatch.context() as m:
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        m.setattr("tempfile.mkstemp", refuse)
        code, out, err = run_cli("reap", *common, "--output", "out", cwd=tmp_path, monkeypatch=monkeypatch,
                                 capsys=capsys)
    assert code == 1 and "cannot write in" in err and "Permission denied" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# ----------------------------------------------------------------------------------------------- (3) one writer

def test_a_second_run_into_a_busy_output_folder_is_refused(tiny_model, calibration, tmp_path, monkeypatch, capsys):
    import os
    import socket
    import subprocess

    from reap_vlm.outputs import lock_path, output_lock

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        lock = lock_path(tmp_path / "out")
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "since": "then"}))
        for script, argv in (("reap", ("--model", str(tiny_model), "--calibration",
                                        str(calibration / "calibration_data.json"), "--device", "cpu")),
                             ("prune_model", ("--model", str(tiny_model), "--metadata",
                                              str(hand_metadata(tiny_model, tmp_path / "reap"))))):
            code, out, err = run_cli(script, *argv, "--output", "out", cwd=tmp_path, monkeypatch=monkeypatch,
                                     capsys=capsys)
            assert code == 1 and err.count("\n") == 1
            assert f"is in use by another run (pid {sleeper.pid} on {socket.gethostname()}" in err
            assert not (tmp_path / "out").exists() and lock.is_file()
    finally:
        sleeper.kill()
        sleeper.wait()
    # the lock of a process that died is taken over; the lock is gone after the run
    with output_lock(tmp_path / "out", "--output"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_saved_sums_use_unique_temporary_names(tmp_path, monkeypatch):
    from reap_vlm.score.resume import ResumeState
    from reap_vlm.score.stats import ExpertStats

    names = []
    real = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, path: (names.append(Path(path).name), real(obj, path)))
    stats = ExpertStats.empty([0], 4, "cpu")
    for _ in range(2):
        ResumeState(tmp_path / "reap_state.pt", "x").save(stats, 1)
    assert len(set(names)) == 2 and sorted(p.name for p in tmp_path.iterdir()) == ["reap_state.pt"]


# ----------------------------------------------------------------------------------------------- (4) reading files

def test_non_utf8_and_wrongly_typed_files_are_one_line(tiny_model, calibration, tmp_path, monkeypatch, capsys):
    calib = calibration / "calibration_data.json"
    common = ("--calibration", str(calib), "--device", "cpu", "--output", "out")
    model = copy_model(tiny_model, tmp_path / "model")
    good = (model / "config.json").read_bytes()
    (model / "config.json").write_bytes(good.replace(b'"model_type"', b'"model\xff_type"', 1))
    code, out, err = run_cli("reap", "--model", str(model), *common, cwd=tmp_path, monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "is not UTF-8 text (byte 0xff at line" in err
    config = json.loads(good)
    config["text_config"]["num_experts"] = "twelve"
    (model / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli("reap", "--model", str(model), *common, cwd=tmp_path, monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "the expert count is missing or of the wrong type" in err
    (model / "config.json").write_bytes(good)
    bad_calib = tmp_path / "calib.json"
    bad_calib.write_bytes(calib.read_bytes() + b"\n\xe9t\xe9")
    code, out, err = run_cli("reap", "--model", str(model), "--calibration", str(bad_calib), "--device", "cpu",
                             "--output", "out", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and f"calibration file {bad_calib} is not UTF-8 text" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field, value, message", [
    ("num_experts", "12", 'field "num_experts" should be a positive integer, found string'),
    ("experts_to_keep", {"0": [1.5]}, 'field "experts_to_keep" should be lists of expert ids in 0..11'),
    ("experts_to_keep", [0, 1], 'field "experts_to_keep" should be an object'),
    ("moe_layers", None, 'field "moe_layers" should be a list of distinct layer numbers, found null'),
    ("prune_ratio", "0.5", 'field "prune_ratio" should be a number in [0, 1)'),
    ("metrics", {"reap": [[1.0]]}, 'field "metrics" should be an object of 4 x 12 number tables'),
])
def test_hand_edited_metadata_is_refused_before_use(tiny_model, tmp_path, monkeypatch, capsys, field, value, message):
    path = hand_metadata(tiny_model, tmp_path / "reap")
    raw = json.loads(path.read_text())
    raw[field] = value
    path.write_text(json.dumps(raw))
    code, out, err = run_cli("prune_model", "--metadata", str(path), "--output", "pruned", "--prune-ratio", "0.5",
                             cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and message in err and str(path) in err
    assert not (tmp_path / "pruned").exists()


def test_hand_edited_pruning_record_is_refused(tiny_model, tmp_path, monkeypatch, capsys):
    from reap_vlm.prune.rewrite import PRUNING_RECORD, prune_checkpoint

    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, {layer: list(range(8)) for layer in range(4)}, progress=False)
    record = json.loads((pruned / PRUNING_RECORD).read_text())
    record["id_map"]["0"]["3"] = "three"
    (pruned / PRUNING_RECORD).write_text(json.dumps(record))
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--output", "report", "--device", "cpu",
                             cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and 'field "id_map" should be an object from layer number' in err
    assert not (tmp_path / "report").exists()


# ----------------------------------------------------------------------------------------------- (5) INCOMPLETE

def test_a_check_that_could_not_run_is_incomplete_not_pass(tiny_model, tmp_path, monkeypatch, capsys):
    from reap_vlm.prune.rewrite import PRUNING_RECORD, prune_checkpoint

    source = copy_model(tiny_model, tmp_path / "source")
    pruned = tmp_path / "pruned"
    prune_checkpoint(source, pruned, {layer: list(range(8)) for layer in range(4)}, progress=False)
    shutil.rmtree(source)  # the original the record names is gone
    fast = ("--num-prompts", "2", "--max-new-tokens", "4", "--device", "cpu")
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--output", "report", *fast,
                             cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 3 and out.startswith("INCOMPLETE: surgery: no original model found") and "PASS" not in out
    report = json.loads((tmp_path / "report" / "test_report.json").read_text())
    assert not report["passed"] and report["verdict"] == out.strip()
    assert (tmp_path / "report" / "test_report.md").read_text().startswith("# Pruned model check: INCOMPLETE")
    # which experts were kept is unknown: the comparison cannot run either
    (pruned / PRUNING_RECORD).unlink()
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--reference", str(tiny_model),
                             "--output", "report2", *fast, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 3 and out.startswith("INCOMPLETE: surgery: which experts were kept is unknown")
    # --reference none asks for no comparison: PASS is allowed
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--reference", "none", "--output",
                             "report3", *fast, cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code in (0, 1) and not out.startswith("INCOMPLETE")


# ----------------------------------------------------------------------------------------------- (6) bad samples

def test_skip_bad_samples_skips_every_kind_it_can_detect(tmp_path, monkeypatch):
    from PIL import Image

    from reap_vlm.calibration.files import load_calibration

    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    truncated = (tmp_path / "small.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(truncated[:len(truncated) // 2])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 stands for a decompression bomb
    bad = {
        "junk": ({"image": "junk.png", "regions": ["a"]}, "image junk.png cannot be read"),
        "cut": ({"image": "cut.png", "regions": ["a"]}, "image cut.png cannot be read"),
        "bomb": ({"image": "big.png", "regions": ["a"]}, "image big.png is too large to decode safely"),
        "role": ({"messages": [{"role": 3, "content": "hi"}]}, "role must be a non-empty string"),
    }
    for name, (item, problem) in bad.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps([{"image": "small.png", "regions": ["a"]}, item]))
        with pytest.raises(ReapError, match="pass --skip-bad-samples") as caught:
            load_calibration(path, 100)
        assert problem in str(caught.value) and "\n" not in str(caught.value)
        calib = load_calibration(path, 100, skip_bad=True)
        assert len(calib.samples) == 1 and problem in calib.skipped[0]
    # when the flag cannot help, the message does not recommend it
    path = tmp_path / "all-bad.json"
    path.write_text(json.dumps([bad["junk"][0], bad["role"][0]]))
    with pytest.raises(ReapError) as caught:
        load_calibration(path, 100, skip_bad=True)
    assert "every drawn item was bad" in str(caught.value) and "--skip-bad-samples" not in str(caught.value)
    from reap_vlm.calibration.encode import open_image

    with pytest.raises(ReapError) as caught:
        open_image(tmp_path / "junk.png", 0)
    assert "--skip-bad-samples" not in str(caught.value)



def test_nan_weights_are_not_blamed_on_the_dtype(tiny_model, calibration, tmp_path):
    model = copy_model(tiny_model, tmp_path / "model")
    rewrite_shard(model, ROUTER, lambda t: t.update({ROUTER: torch.full_like(t[ROUTER], float("nan"))}))
    with pytest.raises(ReapError, match="in float32: the checkpoint's weights hold NaN or inf"):
        run_reap(settings(model, calibration / "calibration_data.json", tmp_path / "out"))
    assert not (tmp_path / "out" / "reap_metadata.json").exists()

# ----------------------------------------------------------------------------------------------- (7) progress bars

def test_an_error_ends_on_its_own_line_after_the_bar_is_closed(capsys):
    import re

    from tqdm.auto import tqdm

    from reap_vlm.cli import run_main

    def main(argv):
        bar = tqdm(total=10, desc="REAP scoring")  # left open, as a bar is when an error escapes its loop
        bar.update(3)
        raise ReapError("scoring failed\nand a second problem")

    assert run_main(main, []) == 1
    err = capsys.readouterr().err
    assert re.search(r"(^|[\r\n])error: scoring failed\nerror: and a second problem\n$", err), repr(err)
    head = err[:err.index("error: scoring failed")]
    assert head.endswith(("\n", "\r")) and "REAP scoring" in head  # the bar was finished before the message


# ----------------------------------------------------------------------------------------------- (8) model card

def test_the_pruned_model_has_its_own_card(tiny_model, calibration, tmp_path):
    from reap_vlm.prune.card import front_matter
    from reap_vlm.prune.rewrite import prune_checkpoint

    source = copy_model(tiny_model, tmp_path / "Tiny-VL-MoE")
    (source / "README.md").write_text("---\nlicense: apache-2.0\nmodel_name: someone/Tiny-VL-MoE\n---\n# Tiny\n")
    metadata = run_reap(settings(source, calibration / "calibration_data.json", tmp_path / "reap"))
    keep = {int(k): v for k, v in metadata["experts_to_keep"].items()}
    out = tmp_path / "pruned"
    prune_checkpoint(source, out, keep, reap_metadata_path=tmp_path / "reap" / "reap_metadata.json", verify=True,
                     progress=False, selection={"source": "metadata", "criterion": "reap"})
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "someone/Tiny-VL-MoE" and meta["license"] == "apache-2.0"
    assert {"reap", "expert-pruning"} <= set(meta["tags"]) and meta["pipeline_tag"] == "image-text-to-text"
    assert "from 12 to 9 (prune ratio 0.25)" in card and "selection criterion: reap" in card
    assert f"calibration: {metadata['num_samples']} samples from calibration_data.json" in card
    assert f"| 0 | {', '.join(map(str, keep[0]))} |" in card
    assert (out / "SOURCE_README.md").read_text() == (source / "README.md").read_text()
    # without a card or a license, the folder's name and no license
    (source / "README.md").unlink()
    prune_checkpoint(source, out, keep, force=True, progress=False)
    meta = front_matter((out / "README.md").read_text())
    assert meta["base_model"] == "Tiny-VL-MoE" and "license" not in meta and not (out / "SOURCE_README.md").exists()


def test_a_reference_with_another_vocabulary_is_refused(tiny_model, tmp_path, monkeypatch, capsys):
    from reap_vlm.prune.rewrite import prune_checkpoint

    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, {layer: list(range(8)) for layer in range(4)}, progress=False)
    other = copy_model(tiny_model, tmp_path / "other")
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(config))
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--reference", str(other), "--output",
                             "report", "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 1 and err.count("\n") == 1 and "has a vocabulary of" in err
    assert not (tmp_path / "report").exists()


# ----------------------------------------------------------------------------------------------- outputs beside models

def test_reap_leftovers_in_a_model_folder_are_not_carried_into_the_pruned_model(tiny_model, tmp_path):
    from reap_vlm.prune.rewrite import prune_checkpoint

    source = copy_model(tiny_model, tmp_path / "model")
    (source / "reap_state.pt").write_bytes(b"state")
    (source / "reap_heatmap.png").write_bytes(b"png")
    out = tmp_path / "pruned"
    prune_checkpoint(source, out, {layer: list(range(8)) for layer in range(4)}, progress=False)
    assert not (out / "reap_state.pt").exists() and not (out / "reap_heatmap.png").exists()


def test_the_report_may_not_go_inside_a_model_folder(tiny_model, tmp_path, monkeypatch, capsys):
    from reap_vlm.prune.rewrite import prune_checkpoint

    pruned = tmp_path / "pruned"
    prune_checkpoint(tiny_model, pruned, {layer: list(range(8)) for layer in range(4)}, progress=False)
    before = snapshot(pruned)
    code, out, err = run_cli("test_pruned_model", "--model", str(pruned), "--reference", "none", "--output",
                             str(pruned / "report"), "--device", "cpu", cwd=tmp_path, monkeypatch=monkeypatch,
                             capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "is inside the pruned model folder" in err
    assert snapshot(pruned) == before


def test_a_non_utf8_env_file_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / ".env").write_bytes(b"REAP_PRUNE_RATIO=0.5\nREAP_MODEL_PATH=/mod\xe8les\n")
    code, out, err = run_cli("prune_model", cwd=tmp_path, monkeypatch=monkeypatch, capsys=capsys)
    assert code == 2 and err.count("\n") == 1 and "is not UTF-8 text (byte 0xe8 at line 2, column 21)" in err
