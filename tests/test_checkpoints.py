"""Tests for the pretrained-module helpers of textimg.utils: safetensors + config.json + a SHA-256 manifest."""

import json

import pytest
import torch

from textimg.utils import (ChecksumError, count_parameters, load_pretrained_state, save_pretrained_module,
                           sha256_file, update_manifest, verify_file)


def small_module():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


def saved(tmp_path):
    """A saved module in tmp_path/ckpt/net, recorded in tmp_path/ckpt/MANIFEST.json."""
    directory = save_pretrained_module(small_module(), {"width": 4, "note": "test"}, tmp_path / "ckpt" / "net")
    manifest = tmp_path / "ckpt" / "MANIFEST.json"
    update_manifest(manifest, [directory / "model.safetensors", directory / "config.json"])
    return directory, manifest


def test_round_trip_with_manifest(tmp_path):
    directory, manifest = saved(tmp_path)
    entries = json.loads(manifest.read_text())
    assert set(entries) == {"net/model.safetensors", "net/config.json"}  # relative to the manifest
    assert entries["net/config.json"] == sha256_file(directory / "config.json")
    state, config = load_pretrained_state(directory, manifest)
    assert config == {"width": 4, "note": "test"}
    expected = small_module().state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)  # buffers (BatchNorm stats) too
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    fresh.load_state_dict(state)
    assert count_parameters(fresh) == 3 * 4 + 4 + 4 + 4


def test_manifest_keeps_other_entries(tmp_path):
    directory, manifest = saved(tmp_path)
    other = tmp_path / "ckpt" / "other.txt"
    other.write_text("hello")
    update_manifest(manifest, [other])
    assert set(json.loads(manifest.read_text())) == {"net/model.safetensors", "net/config.json", "other.txt"}


def test_missing_file_is_named(tmp_path):
    directory, manifest = saved(tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
        load_pretrained_state(directory, manifest)
    with pytest.raises(FileNotFoundError, match="no checkpoint manifest"):
        load_pretrained_state(directory, tmp_path / "nope.json")


def test_corrupted_file_is_named(tmp_path):
    directory, _ = saved(tmp_path)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors could not be read"):
        load_pretrained_state(directory)  # no manifest: the reader itself notices
    directory, _ = saved(tmp_path / "again")
    (directory / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_pretrained_state(directory)


def test_hash_mismatch_is_named(tmp_path):
    directory, manifest = saved(tmp_path)
    save_pretrained_module(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)),
                           {"width": 4, "note": "test"}, directory)  # a valid file, but not the recorded one
    with pytest.raises(ChecksumError, match=r"model\.safetensors does not match its SHA-256"):
        load_pretrained_state(directory, manifest)
    load_pretrained_state(directory)  # without a manifest it still loads: the check is the manifest's job


def test_file_not_in_manifest(tmp_path):
    directory, manifest = saved(tmp_path)
    stray = tmp_path / "ckpt" / "stray.bin"
    stray.write_bytes(b"x")
    with pytest.raises(ChecksumError, match="stray.bin is not recorded"):
        verify_file(stray, manifest)


def test_half_written_file_never_replaces_a_good_one(tmp_path, monkeypatch):
    import safetensors.torch

    directory, manifest = saved(tmp_path)
    good = (directory / "model.safetensors").read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained_module(small_module(), {"width": 4}, directory)
    assert (directory / "model.safetensors").read_bytes() == good
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]  # no temp file
    load_pretrained_state(directory, manifest)  # still the recorded checkpoint


def test_a_pickle_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path(%r).write_text('ran')" % str(tmp_path / "pwned"),))

    directory, _ = saved(tmp_path)
    torch.save({"weight": Evil()}, directory / "model.safetensors")  # a pickle in disguise
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        load_pretrained_state(directory)
    assert not (tmp_path / "pwned").exists()


def test_a_recorded_hash_makes_a_folder_check_itself(tmp_path):
    directory = save_pretrained_module(small_module(), {"width": 4}, tmp_path / "net", record_hash=True)
    state, config = load_pretrained_state(directory)  # no manifest needed
    assert config["weights_sha256"] == sha256_file(directory / "model.safetensors")
    data = bytearray((directory / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (directory / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors does not match the SHA-256 recorded in"):
        load_pretrained_state(directory)
