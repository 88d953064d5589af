"""Saved networks and pipelines (textimg.utils): ModelMixin.save_pretrained / from_pretrained (safetensors +
config.json with the weights' SHA-256), the SHA-256 manifest of the committed checkpoints, the upgrade of
textimg-0.1 configs, save_pipeline / load_pipeline, and the committed checkpoints/ folder itself."""

import json
from dataclasses import dataclass

import pytest
import torch

import textimg.config
from textimg.config import CHECKPOINTS, MANIFEST, PIPELINE_DIR, PresetConfig
from textimg.generator import Generator, GeneratorConfig
from textimg.refiner import Refiner, RefinerConfig
from textimg.utils import (
    CONFIG_NAME,
    MODEL_CLASSES,
    PIPELINE_FORMAT,
    PIPELINE_NAME,
    WEIGHTS_NAME,
    ChecksumError,
    ModelMixin,
    load_pipeline,
    manifest_for,
    read_config,
    read_manifest,
    save_pipeline,
    sha256_file,
    update_manifest,
    verify_file,
)
from textimg.vqvae import VQVAE


@dataclass
class TinyConfig(PresetConfig):
    width: int = 4


class TinyNet(ModelMixin, torch.nn.Module):
    """A Linear and a BatchNorm: parameters and buffers, the two things a state dict holds."""

    config_class = TinyConfig

    def __init__(self, cfg: TinyConfig):
        super().__init__()
        self.cfg = cfg
        self.net = torch.nn.Sequential(torch.nn.Linear(3, cfg.width), torch.nn.BatchNorm1d(cfg.width))

    def forward(self, x):
        return self.net(x)


def tiny_net(seed: int = 0, width: int = 4) -> TinyNet:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = TinyNet(TinyConfig(width))
        net.train()(torch.randn(8, 3))  # BatchNorm's running statistics leave their defaults
    return net


def saved(tmp_path, facts=None):
    """A TinyNet saved in tmp_path/ckpt/net, recorded in tmp_path/ckpt/MANIFEST.json."""
    manifest = tmp_path / "ckpt" / "MANIFEST.json"
    directory = tiny_net().save_pretrained(tmp_path / "ckpt" / "net", facts, manifest)
    return directory, manifest


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def edit_config(directory, **changes):
    config = json.loads((directory / CONFIG_NAME).read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / CONFIG_NAME).write_text(json.dumps(config))


def flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


# --- ModelMixin: save_pretrained / from_pretrained -----------------------------------------------

def test_round_trip_with_manifest(tmp_path):
    directory, manifest = saved(tmp_path, {"note": "test", "training": {"steps": 3}})
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    entries = json.loads(manifest.read_text())
    assert set(entries) == {"net/model.safetensors", "net/config.json"}  # relative to the manifest
    assert entries["net/config.json"] == sha256_file(directory / CONFIG_NAME)
    assert read_config(directory) == {"class": "TinyNet", "config": {"width": 4}, "note": "test",
                                      "training": {"steps": 3},
                                      "weights_sha256": sha256_file(directory / WEIGHTS_NAME)}
    loaded = TinyNet.from_pretrained(directory, manifest)
    assert isinstance(loaded, TinyNet) and loaded.cfg == TinyConfig(4) and not loaded.training
    assert same_state(loaded, tiny_net())  # buffers (BatchNorm statistics) too
    assert loaded.num_parameters() == 3 * 4 + 4 + 4 + 4
    by_name = ModelMixin.from_pretrained(directory)  # on ModelMixin: the class config.json names
    assert type(by_name) is TinyNet and MODEL_CLASSES["TinyNet"] is TinyNet and same_state(by_name, loaded)


def test_real_networks_round_trip(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        refiner = Refiner(RefinerConfig.preset("quick", text_dim=32))
        generator = Generator(GeneratorConfig.preset("quick", text_dim=32))
    for model in (refiner, generator):
        loaded = type(model).from_pretrained(model.save_pretrained(tmp_path / type(model).__name__))
        assert loaded.cfg == model.cfg and same_state(loaded, model)


def test_manifest_keeps_other_entries(tmp_path):
    directory, manifest = saved(tmp_path)
    other = tmp_path / "ckpt" / "other.txt"
    other.write_text("hello")
    update_manifest(manifest, [other])
    assert set(read_manifest(manifest)) == {"net/model.safetensors", "net/config.json", "other.txt"}
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        update_manifest(manifest, [tmp_path / "ckpt" / "missing.txt"])


def test_missing_file_is_named(tmp_path):
    directory, manifest = saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="no checkpoint manifest"):
        TinyNet.from_pretrained(directory, tmp_path / "nope.json")
    (directory / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"net/model\.safetensors is missing"):
        TinyNet.from_pretrained(directory)
    directory, manifest = saved(tmp_path / "again")
    (directory / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=r"net/config\.json is missing"):
        TinyNet.from_pretrained(directory, manifest)


def test_a_flipped_byte_is_a_checksum_error_naming_the_file(tmp_path):
    directory, manifest = saved(tmp_path)
    flip_last_byte(directory / WEIGHTS_NAME)
    with pytest.raises(ChecksumError, match=r"net/model\.safetensors does not match the SHA-256 recorded in .*"
                                            r"net/config\.json"):
        TinyNet.from_pretrained(directory)  # no manifest: config.json's own hash catches it
    with pytest.raises(ChecksumError, match=r"net/model\.safetensors does not match its SHA-256 in .*MANIFEST\.json"):
        TinyNet.from_pretrained(directory, manifest)
    directory, manifest = saved(tmp_path / "again")
    edit_config(directory, note="edited")  # a changed config.json is caught by the manifest
    with pytest.raises(ChecksumError, match=r"net/config\.json does not match its SHA-256"):
        TinyNet.from_pretrained(directory, manifest)


def test_hash_mismatch_against_the_manifest(tmp_path):
    directory, manifest = saved(tmp_path)
    tiny_net(seed=1).save_pretrained(directory)  # a valid folder, but not the recorded one
    with pytest.raises(ChecksumError, match=r"model\.safetensors does not match its SHA-256"):
        TinyNet.from_pretrained(directory, manifest)
    assert same_state(TinyNet.from_pretrained(directory), tiny_net(seed=1))  # without a manifest it loads


def test_file_not_in_manifest(tmp_path):
    directory, manifest = saved(tmp_path)
    stray = tmp_path / "ckpt" / "stray.bin"
    stray.write_bytes(b"x")
    with pytest.raises(ChecksumError, match="stray.bin is not recorded"):
        verify_file(stray, manifest)
    unrecorded = tiny_net().save_pretrained(tmp_path / "ckpt" / "unrecorded")  # saved without the manifest
    with pytest.raises(ChecksumError, match=r"unrecorded/model\.safetensors is not recorded"):
        TinyNet.from_pretrained(unrecorded, manifest)


def test_corrupted_file_is_named(tmp_path):
    directory, _ = saved(tmp_path)
    edit_config(directory, weights_sha256=None)  # without the recorded hash the reader itself notices
    weights = directory / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:40])  # truncated
    with pytest.raises(ValueError, match=r"model\.safetensors could not be read"):
        TinyNet.from_pretrained(directory)
    directory, _ = saved(tmp_path / "again")
    (directory / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        TinyNet.from_pretrained(directory)
    (directory / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json is not a textimg model config"):
        TinyNet.from_pretrained(directory)


def test_another_class_is_refused(tmp_path):
    directory, _ = saved(tmp_path)
    edit_config(directory, **{"class": "Generator"})
    with pytest.raises(ValueError, match=r"config\.json holds a Generator, not a TinyNet"):
        TinyNet.from_pretrained(directory)
    edit_config(directory, **{"class": "NoSuchNet"})
    with pytest.raises(ValueError, match="holds a NoSuchNet"):
        ModelMixin.from_pretrained(directory)
    refiner_dir = Refiner(RefinerConfig.preset("quick", text_dim=32)).save_pretrained(tmp_path / "refiner")
    with pytest.raises(ValueError, match="holds a Refiner, not a VQVAE"):  # a subclass is another class
        VQVAE.from_pretrained(refiner_dir)
    assert type(ModelMixin.from_pretrained(refiner_dir)) is Refiner


def test_weights_of_another_shape_are_refused(tmp_path):
    directory, _ = saved(tmp_path)
    edit_config(directory, config={"width": 8})
    with pytest.raises(ValueError, match="do not describe the same TinyNet"):
        TinyNet.from_pretrained(directory)
    edit_config(directory, config={"width": 4, "depth": 2})
    with pytest.raises(ValueError, match="unknown TinyConfig field"):
        TinyNet.from_pretrained(directory)


def test_half_written_file_never_replaces_a_good_one(tmp_path, monkeypatch):
    import safetensors.torch

    directory, manifest = saved(tmp_path)
    good = (directory / WEIGHTS_NAME).read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(good[: len(good) // 2])
        raise KeyboardInterrupt  # the process is killed mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        tiny_net(seed=1).save_pretrained(directory)
    assert (directory / WEIGHTS_NAME).read_bytes() == good
    assert sorted(p.name for p in directory.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp file
    assert same_state(TinyNet.from_pretrained(directory, manifest), tiny_net())  # still the recorded checkpoint


def test_a_pickle_is_refused_not_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path(%r).write_text('ran')" % str(tmp_path / "pwned"),))

    directory, _ = saved(tmp_path)
    torch.save({"weight": Evil()}, directory / WEIGHTS_NAME)  # a pickle in disguise
    with pytest.raises(ChecksumError):
        TinyNet.from_pretrained(directory)  # the recorded hash refuses it before it is read
    edit_config(directory, weights_sha256=None)
    with pytest.raises(ValueError, match="could not be read as safetensors"):
        TinyNet.from_pretrained(directory)  # and without one the safetensors reader does
    assert not (tmp_path / "pwned").exists()


# --- textimg 0.1 configs load without being rewritten --------------------------------------------

def test_0_1_configs_are_upgraded_on_load(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        refiner = Refiner(RefinerConfig.preset("quick", text_dim=32))
        generator = Generator(GeneratorConfig.preset("quick", text_dim=32))
    old_refiner = refiner.save_pretrained(tmp_path / "refiner")
    (old_refiner / CONFIG_NAME).write_text(json.dumps({  # what textimg 0.1's save_refiner wrote
        "model": "Refiner", "config": refiner.cfg.to_dict(), "text_encoder": "tiny-bert", "parameters": 1}))
    before = (old_refiner / CONFIG_NAME).read_bytes()
    for loader in (Refiner, ModelMixin):
        loaded = loader.from_pretrained(old_refiner)
        assert type(loaded) is Refiner and loaded.cfg == refiner.cfg and same_state(loaded, refiner)
    assert (old_refiner / CONFIG_NAME).read_bytes() == before  # read, never rewritten

    old_generator = generator.save_pretrained(tmp_path / "generator")
    (old_generator / CONFIG_NAME).write_text(json.dumps({  # 0.1's save_generator: the config under "generator"
        "model": "Generator", "generator": generator.cfg.to_dict(), "text_encoder": "tiny-bert"}))
    loaded = Generator.from_pretrained(old_generator)
    assert loaded.cfg == generator.cfg and same_state(loaded, generator)
    with pytest.raises(ValueError, match="holds a Generator, not a Refiner"):
        Refiner.from_pretrained(old_generator)

    nameless = tiny_net().save_pretrained(tmp_path / "nameless")
    (nameless / CONFIG_NAME).write_text(json.dumps({"config": {"width": 4}}))  # no class: the caller's
    assert same_state(TinyNet.from_pretrained(nameless), tiny_net())
    with pytest.raises(ValueError, match="not a textimg model config"):
        ModelMixin.from_pretrained(nameless)  # nothing names the class


# --- the manifest of the committed folder --------------------------------------------------------

def test_manifest_for_inside_and_outside_checkpoints(tmp_path):
    assert manifest_for(CHECKPOINTS) == MANIFEST
    assert manifest_for(CHECKPOINTS / "judge") == MANIFEST
    assert manifest_for(PIPELINE_DIR / "generator") == MANIFEST
    assert manifest_for(CHECKPOINTS / "not_yet_made") == MANIFEST  # where a new committed model would go
    assert manifest_for(tmp_path) is None
    assert manifest_for(CHECKPOINTS.parent / "checkpoints2") is None  # a prefix of the name is not inside
    assert manifest_for(CHECKPOINTS / ".." / "runs" / "models") is None  # resolved, not compared as text


def test_a_folder_inside_checkpoints_is_checked_against_the_manifest(tmp_path, monkeypatch):
    fake = tmp_path / "checkpoints"
    monkeypatch.setattr(textimg.config, "CHECKPOINTS", fake)
    monkeypatch.setattr(textimg.config, "MANIFEST", fake / "MANIFEST.json")
    update_manifest(fake / "MANIFEST.json", [])  # an empty manifest
    directory = tiny_net().save_pretrained(fake / "net")  # saved without recording it
    with pytest.raises(ChecksumError, match=r"net/model\.safetensors is not recorded in"):
        TinyNet.from_pretrained(directory)  # the default manifest of a folder inside checkpoints/
    tiny_net().save_pretrained(directory, manifest=manifest_for(directory))
    assert same_state(TinyNet.from_pretrained(directory), tiny_net())


# --- save_pipeline / load_pipeline ---------------------------------------------------------------

def test_pipeline_round_trip_with_manifest(tmp_path):
    manifest = tmp_path / "MANIFEST.json"
    directory = save_pipeline(tmp_path / "pipe", "MyPipeline", {"net": tiny_net(), "extra": None}, {"note": 1},
                              manifest)
    assert sorted(p.name for p in directory.iterdir()) == ["net", PIPELINE_NAME]  # no folder for None
    config = json.loads((directory / PIPELINE_NAME).read_text())
    assert PIPELINE_FORMAT == "textimg.pipeline/2"
    assert config == {"format": PIPELINE_FORMAT, "class": "MyPipeline",
                      "components": {"net": "TinyNet", "extra": None}, "note": 1}
    assert set(read_manifest(manifest)) == {"pipe/net/model.safetensors", "pipe/net/config.json", "pipe/pipeline.json"}
    loaded_config, components = load_pipeline(directory, "MyPipeline")
    assert loaded_config == config and set(components) == {"net", "extra"} and components["extra"] is None
    assert type(components["net"]) is TinyNet and same_state(components["net"], tiny_net())


def test_pipeline_errors_name_the_file(tmp_path):
    directory = save_pipeline(tmp_path / "pipe", "MyPipeline", {"net": tiny_net()})
    with pytest.raises(ValueError, match=r"pipeline\.json does not describe a OtherPipeline"):
        load_pipeline(directory, "OtherPipeline")
    flip_last_byte(directory / "net" / WEIGHTS_NAME)
    with pytest.raises(ChecksumError, match=r"net/model\.safetensors does not match"):
        load_pipeline(directory, "MyPipeline")
    tiny_net().save_pretrained(directory / "net")
    config = json.loads((directory / PIPELINE_NAME).read_text())
    (directory / PIPELINE_NAME).write_text(json.dumps({**config, "components": {"net": "Generator"}}))
    with pytest.raises(ValueError, match="names a Generator for 'net'.*holds a TinyNet"):
        load_pipeline(directory, "MyPipeline")
    (directory / PIPELINE_NAME).write_text(json.dumps({**config, "format": "textimg.pipeline/1"}))
    with pytest.raises(ValueError, match="format 'textimg.pipeline/2' expected"):
        load_pipeline(directory, "MyPipeline")
    (directory / PIPELINE_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no pipeline.json in"):
        load_pipeline(directory, "MyPipeline")


# --- the committed checkpoints/ folder -----------------------------------------------------------

def test_every_committed_file_matches_the_manifest():
    entries = read_manifest(MANIFEST)
    assert entries, "the manifest is empty"
    for name, digest in entries.items():
        path = CHECKPOINTS / name
        assert path.is_file(), f"{name} is in MANIFEST.json but not in checkpoints/"
        assert sha256_file(path) == digest, f"{name} does not match its SHA-256 in MANIFEST.json"
        verify_file(path, MANIFEST)


def test_every_file_under_checkpoints_is_in_the_manifest():
    entries = read_manifest(MANIFEST)
    present = {p.relative_to(CHECKPOINTS).as_posix() for p in CHECKPOINTS.rglob("*") if p.is_file()}
    local = {p for p in present if p.startswith("training/") or p == "train_config.json"}  # git-ignored run state
    assert present - local - {"README.md", "MANIFEST.json"} == set(entries), \
        "files not in MANIFEST.json (or the reverse)"


@pytest.mark.parametrize("folder, cls", [("judge", "Judge"), ("refiner", "Refiner"),
                                         ("pipeline/generator", "Generator"), ("pipeline/refiner", "Refiner")])
def test_every_committed_network_loads_as_its_class(folder, cls):
    model = ModelMixin.from_pretrained(CHECKPOINTS / folder)  # checked against MANIFEST.json
    assert type(model).__name__ == cls and not model.training
    assert read_config(CHECKPOINTS / folder)["weights_sha256"] == sha256_file(CHECKPOINTS / folder / WEIGHTS_NAME)


def test_the_committed_pipeline_folder_loads():
    config, components = load_pipeline(PIPELINE_DIR, "TextToImagePipeline")
    assert config["components"] == {"generator": "Generator", "refiner": "Refiner"}
    assert type(components["generator"]) is Generator and type(components["refiner"]) is Refiner
    assert config["text_encoder"] == "minilm"
