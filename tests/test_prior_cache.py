"""The prior cache: building it with the pipeline, reading it as stage two's PriorSource,
resuming, verifying, and refusing stale or mismatched entries, and two processes building the
same cache as one. (Kill -9 at random moments is checked by tools/check_cache_kill_resume.py;
see its recorded result in BENCHMARKS.md.)"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_prior.cache import PriorCache, PriorCacheError, encode_entry, file_sha256, read_entry
from ldm_prior.model import PriorModel
from ldm_prior.sampling import PriorSampler, SamplingSettings, image_seed
from pipelines.cache_priors import main as cache_priors
from swintormer.core.data.paired import PairedImageDataset, discover_pairs
from swintormer.core.image_io import read_image, write_image
from swintormer.core.priors import PriorMissingError, PriorSource

SIZES = [(23, 31), (18, 40), (33, 20)]
ARGS = ["--steps", "2", "--mode", "quarter", "--seed", "9"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    from skimage import data

    root = tmp_path_factory.mktemp("cache")
    photo = data.coffee().astype(np.float32) / 255
    for index, (height, width) in enumerate(SIZES):
        sharp = photo[50 * index : 50 * index + height, 70 : 70 + width]
        write_image(root / "data" / "target" / f"p{index}.png", sharp)
        write_image(root / "data" / "input" / f"p{index}.png", (sharp + np.roll(sharp, 1, axis=1)) / 2)
    PriorModel.from_config("tiny", seed=2).save_pretrained(root / "prior")
    assert cache_priors(["--prior", str(root / "prior"), "--data", str(root / "data"), "--out", str(root / "cache"), *ARGS]) == 0
    return {"root": root, "data": root / "data", "prior": root / "prior", "cache": root / "cache"}


def _entries(cache: Path) -> dict[str, bytes]:
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted((cache / "entries").rglob("*.safetensors"))}


def _run(setup, out: Path, *extra: str) -> int:
    return cache_priors(["--prior", str(setup["prior"]), "--data", str(setup["data"]), "--out", str(out), *ARGS, *extra])


def test_entries_hold_the_sampled_prior_in_float16_with_metadata(setup) -> None:
    cache = PriorCache(setup["cache"])
    assert isinstance(cache, PriorSource)
    model = PriorModel.from_pretrained(setup["prior"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the pipeline's default thread count (results depend on it at the last bit)
    try:
        sampler = PriorSampler(model, SamplingSettings(steps=2, mode="quarter"))
        for index, (height, width) in enumerate(SIZES):
            blurry = setup["data"] / "input" / f"p{index}.png"
            prior = cache.prior_for(blurry)
            assert prior.shape == (height, width, 3) and prior.dtype == np.float32
            # Seeded from the run seed and the file's SHA-256 (the content rule), not its path.
            direct = sampler.sample(read_image(blurry).pixels, image_seed(9, file_sha256(blurry)))
            assert np.array_equal(prior, direct.astype(np.float16).astype(np.float32))
    finally:
        torch.set_num_threads(threads)
    _, metadata = read_entry(cache.entry_for(setup["data"] / "input" / "p0.png"))
    assert metadata["steps"] == "2" and metadata["mode"] == "quarter" and metadata["seed"] == "9"
    assert metadata["seed_rule"] == "content"
    assert metadata["prior_fingerprint"] == model.fingerprint() and len(metadata["source_sha256"]) == 64
    manifest = json.loads((setup["cache"] / "manifest.json").read_text())
    assert manifest["settings"]["prior_fingerprint"] == model.fingerprint()


def test_two_processes_build_the_same_cache_as_one(setup, tmp_path, accelerate_launch) -> None:
    def launched(processes: int) -> subprocess.CompletedProcess:
        command = [*accelerate_launch(processes), "-m", "pipelines.cache_priors", "--prior", str(setup["prior"]),
                   "--data", str(setup["data"]), "--out", str(tmp_path / str(processes)), *ARGS]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return done

    one, two = launched(1), launched(2)
    # Both processes took part (the three images are shared out round-robin)…
    assert "process 0/1: 3 priors made" in one.stdout
    assert "process 0/2: 2 priors made" in two.stdout and "process 1/2: 1 priors made" in two.stdout
    # …and the process count does not change a single byte.
    assert _entries(tmp_path / "2") == _entries(tmp_path / "1")
    assert (tmp_path / "2" / "manifest.json").read_bytes() == (tmp_path / "1" / "manifest.json").read_bytes()
    # A plain (non-launched) run agrees to float16 rounding: inside a launched process group the
    # CPU kernels may round the last bits differently (seen: at most 2 float16 steps).
    for name in _entries(tmp_path / "2"):
        launched_prior, _ = read_entry(tmp_path / "2" / name)
        plain_prior, _ = read_entry(setup["cache"] / name)
        assert np.abs(launched_prior.astype(np.float32) - plain_prior.astype(np.float32)).max() <= 4e-3


def test_entry_bytes_do_not_depend_on_metadata_order() -> None:
    prior = np.random.default_rng(0).random((4, 5, 3), dtype=np.float32)
    assert encode_entry(prior, {"a": "1", "b": "2"}) == encode_entry(prior, {"b": "2", "a": "1"})


def test_stage_two_dataset_reads_the_cached_prior(setup) -> None:
    pairs = discover_pairs(setup["data"]).pairs
    dataset = PairedImageDataset(pairs, prior_source=PriorCache(setup["cache"]))
    item = dataset[1]
    assert item["input"].shape[0] == 6
    expected = PriorCache(setup["cache"]).prior_for(pairs[1].blurry)
    assert np.allclose(item["input"][3:].permute(1, 2, 0).numpy(), expected)


def test_rerun_skips_valid_entries_and_remakes_damaged_ones(setup, capsys) -> None:
    out = setup["root"] / "resume"
    assert _run(setup, out) == 0
    reference = _entries(out)
    assert reference == _entries(setup["cache"])  # same settings, same bytes
    entries = sorted((out / "entries").rglob("*.safetensors"))
    entries[0].unlink()
    entries[1].write_bytes(entries[1].read_bytes()[:100])  # a damaged file
    capsys.readouterr()
    assert _run(setup, out, "--verify") == 1
    problems = capsys.readouterr().err
    assert "missing" in problems and "unreadable" in problems
    untouched = entries[2].stat().st_mtime_ns
    assert _run(setup, out) == 0
    assert "2 priors made, 1 already valid" in capsys.readouterr().out
    assert entries[2].stat().st_mtime_ns == untouched
    assert _entries(out) == reference
    assert _run(setup, out, "--verify") == 0
    # an entry of another size than its image, its metadata otherwise right: --verify names both sizes
    prior, metadata = read_entry(entries[2])
    entries[2].write_bytes(encode_entry(prior[:-1], {**metadata, "height": str(prior.shape[0] - 1)}))
    capsys.readouterr()
    assert _run(setup, out, "--verify") == 1
    height, width = prior.shape[:2]
    assert f"prior is {height - 1}x{width}, the image {height}x{width}" in capsys.readouterr().err


def test_a_cache_another_job_is_building_is_refused(setup, capsys) -> None:
    from swintormer.core.run_control import RunFolderLock

    out = setup["root"] / "busy"
    assert _run(setup, out) == 0
    entries = sorted((out / "entries").rglob("*.safetensors"))
    entries[0].unlink()  # work the second job would do
    capsys.readouterr()
    with RunFolderLock(out):  # as a first job holds it while it samples
        assert _run(setup, out) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"prior cache {out} is in use by pid " in err
        assert not entries[0].exists()
    assert _run(setup, out) == 0 and entries[0].exists()


def test_reader_refuses_other_settings_and_changed_sources(setup, capsys, tmp_path) -> None:
    with pytest.raises(PriorCacheError, match="steps is '2', expected '50'"):
        PriorCache(setup["cache"], expected={"steps": 50})
    assert _run(setup, setup["cache"], "--steps", "3") == 2  # last --steps wins: 3
    assert "error:" in capsys.readouterr().err
    # A copy of the dataset whose first image has changed since the cache was made.
    moved = tmp_path / "data"
    shutil.copytree(setup["data"], moved)
    write_image(moved / "input" / "p0.png", np.zeros((23, 31, 3), np.float32))
    cache = PriorCache(setup["cache"], data_root=moved)
    with pytest.raises(PriorCacheError, match="changed since its prior was made"):
        cache.prior_for(moved / "input" / "p0.png")
    assert cache.prior_for(moved / "input" / "p1.png").shape == (18, 40, 3)
    with pytest.raises(PriorMissingError, match="no prior in cache"):
        cache.prior_for(moved / "target" / "p1.png")


def test_timestep_spacing_is_a_cache_setting_and_older_caches_read_as_leading(setup, capsys, tmp_path) -> None:
    assert json.loads((setup["cache"] / "manifest.json").read_text())["settings"]["timestep_spacing"] == "leading"
    with pytest.raises(PriorCacheError, match="timestep_spacing is 'leading', expected 'trailing'"):
        PriorCache(setup["cache"], expected={"timestep_spacing": "trailing"})
    assert _run(setup, setup["cache"], "--timestep-spacing", "trailing") == 2
    assert "timestep_spacing" in capsys.readouterr().err
    # A cache written before the setting existed: no timestep_spacing in its manifest or entries.
    old = tmp_path / "old"
    shutil.copytree(setup["cache"], old)
    manifest = json.loads((old / "manifest.json").read_text())
    del manifest["settings"]["timestep_spacing"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    for entry in (old / "entries").rglob("*.safetensors"):
        prior, metadata = read_entry(entry)
        del metadata["timestep_spacing"]
        entry.write_bytes(encode_entry(prior, metadata))
    cache = PriorCache(old, data_root=setup["data"], expected={"timestep_spacing": "leading"})
    assert np.array_equal(cache.prior_for(setup["data"] / "input" / "p1.png"),
                          PriorCache(setup["cache"]).prior_for(setup["data"] / "input" / "p1.png"))
    assert _run(setup, old, "--verify") == 0
    assert _run(setup, old) == 0 and "0 priors made, 3 already valid" in capsys.readouterr().out


def test_export_writes_each_cached_prior_as_a_16_bit_png_named_after_its_image(setup, capsys, tmp_path) -> None:
    out = tmp_path / "png"
    assert _run(setup, setup["cache"], "--export", str(out)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["p0.png", "p1.png", "p2.png"]
    cache = PriorCache(setup["cache"])
    for index in range(len(SIZES)):
        exported = read_image(out / f"p{index}.png")
        assert exported.bit_depth == 16
        cached = cache.prior_for(setup["data"] / "input" / f"p{index}.png")
        assert np.abs(exported.pixels - cached).max() <= 0.5 / 65535 + 1e-7  # 16-bit rounding only
    # A missing entry is reported and the rest still exported; the exit status says so.
    partial = tmp_path / "partial"
    shutil.copytree(setup["cache"], partial)
    cache = PriorCache(partial, data_root=setup["data"])
    cache.entry_for(setup["data"] / "input" / "p1.png").unlink()
    capsys.readouterr()
    assert _run(setup, partial, "--export", str(tmp_path / "png2")) == 1
    captured = capsys.readouterr()
    assert "exported 2 of 3" in captured.out and "no prior in cache" in captured.err
    assert sorted(p.name for p in (tmp_path / "png2").iterdir()) == ["p0.png", "p2.png"]
    # An export folder that cannot be made, or a folder that is no cache: one error line, exit 2.
    (tmp_path / "a_file").write_text("")
    assert _run(setup, setup["cache"], "--export", str(tmp_path / "a_file" / "png")) == 2
    assert _run(setup, tmp_path / "png", "--export", str(tmp_path / "png3")) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 2 and "cannot create the export folder" in errors[0] and "no cache manifest" in errors[1]


def test_bad_command_lines_exit_with_one_error_line(setup, capsys, tmp_path) -> None:
    assert cache_priors(["--prior", str(setup["prior"]), "--data", str(tmp_path / "none"), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "none" in err and err.count("\n") == 1
    assert cache_priors(["--prior", str(tmp_path / "no_prior"), "--data", str(setup["data"]), "--out", str(tmp_path / "c")]) == 2
    assert "prior not found" in capsys.readouterr().err


def test_split_limits_a_build_an_export_and_a_check_to_one_split_of_the_root(setup, capsys, tmp_path) -> None:
    root = tmp_path / "root"
    for split in ("train", "test"):
        shutil.copytree(setup["data"], root / split)
    cache = tmp_path / "cache"
    base = ["--prior", str(setup["prior"]), "--data", str(root), "--out", str(cache), *ARGS]
    assert cache_priors([*base, "--split", "test"]) == 0
    assert sorted(_entries(cache)) == [f"entries/test/input/p{index}.png.safetensors" for index in range(len(SIZES))]
    assert cache_priors([*base, "--verify", "--split", "test"]) == 0
    assert cache_priors([*base, "--verify"]) == 1  # the train split has no entries
    assert cache_priors([*base, "--export", str(tmp_path / "png"), "--split", "test"]) == 0
    assert sorted(p.relative_to(tmp_path / "png").as_posix() for p in (tmp_path / "png").rglob("*.png")) == [
        f"test/p{index}.png" for index in range(len(SIZES))]
    capsys.readouterr()
    assert cache_priors([*base, "--export", str(tmp_path / "png"), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --split val: not a split of") and "test, train" in err and err.count("\n") == 1
