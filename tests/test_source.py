"""model/source.py: the one rule by which every caller turns --model into a checkpoint folder."""

import json

import pytest

from llm_activations.errors import UsageError
from llm_activations.model import source


def _folder(tmp_path, *names, index=None):
    tmp_path.mkdir(exist_ok=True)
    for name in names:
        (tmp_path / name).write_text("{}")
    if index is not None:
        (tmp_path / source.INDEX_FILE).write_text(json.dumps({"weight_map": index}))
    return str(tmp_path)


def test_a_folder_is_itself_and_a_file_or_a_path_is_refused(tmp_path):
    assert source.resolve(str(tmp_path)) == str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UsageError, match=r"config\.json is a file; give the checkpoint folder or a hub id"):
        source.resolve(str(tmp_path / "config.json"))
    for missing in (str(tmp_path / "nope"), "./nope", "a/b/c", "nope"):
        with pytest.raises(UsageError, match="no such checkpoint folder, and not a hub id"):
            source.resolve(missing)


def test_hub_ids():
    assert [source.is_hub_id(t) for t in ("Qwen/Qwen2.5-7B", "org/name")] == [True, True]
    assert not any(source.is_hub_id(t) for t in ("name", "/abs/path", "./x/y", "a/b/c", "org/", "/name", "~/x", "gs://b/x"))


def test_unreachable_hub_id_is_one_line():
    # tests/conftest.py sets HF_HUB_OFFLINE=1: the hub cannot serve it
    with pytest.raises(UsageError) as e:
        source.resolve("no-such-org/no-such-model")
    assert "'no-such-org/no-such-model': no such checkpoint folder, and the Hugging Face hub did not serve it" in str(e.value)
    assert "\n" not in str(e.value)


def test_weight_files_index_or_single_file_only(tmp_path):
    single = _folder(tmp_path / "single", "model.safetensors", "other.safetensors")
    assert source.weight_files(single) == [f"{single}/model.safetensors"]
    sharded = _folder(tmp_path / "sharded", "b.safetensors", "a.safetensors", index={"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"})
    assert source.weight_files(sharded) == [f"{sharded}/a.safetensors", f"{sharded}/b.safetensors"]
    # one safetensors file under another name is not a checkpoint (no glob fallback)
    renamed = _folder(tmp_path / "renamed", "weights.safetensors")
    with pytest.raises(UsageError, match=r"has no model\.safetensors or model\.safetensors\.index\.json"):
        source.weight_files(renamed)
    broken = _folder(tmp_path / "broken", "a.safetensors", index={"x": "a.safetensors", "y": "gone.safetensors"})
    with pytest.raises(UsageError, match=r"model\.safetensors\.index\.json names gone\.safetensors, which is missing"):
        source.weight_files(broken)


def test_check_folder_names_the_missing_part(tmp_path):
    with pytest.raises(UsageError, match=r"has no config\.json"):
        source.check_folder(_folder(tmp_path / "a", "model.safetensors", "tokenizer.json"))
    with pytest.raises(UsageError, match=r"has no model\.safetensors"):
        source.check_folder(_folder(tmp_path / "b", "config.json", "tokenizer.json"))
    with pytest.raises(UsageError, match=r"has no tokenizer files \(tokenizer\.json / tokenizer_config\.json / vocab\.json\)"):
        source.check_folder(_folder(tmp_path / "c", "config.json", "model.safetensors"))
    source.check_folder(_folder(tmp_path / "d", "config.json", "model.safetensors", "vocab.json"))


def test_extract_keeps_a_hub_id_for_its_workers(monkeypatch, tmp_path):
    """Workers of a distributed runner cannot see the launcher's download folder: the launcher
    checks the downloaded checkpoint, but hands the hub id on, for each worker to resolve."""
    import huggingface_hub

    from llm_activations import demo
    from llm_activations.options import ExtractConfig, check_config

    folder = demo.ensure_demo_model()
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, allow_patterns=None: asked.append(repo_id) or folder)
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    cfg, model_cfg, _ = check_config(ExtractConfig(model="demo-org/tiny-qwen2", inputs=(str(corpus),),
                                                   output=str(tmp_path / "out")))
    assert cfg.model == "demo-org/tiny-qwen2" and "demo-org/tiny-qwen2" in asked
    assert model_cfg.num_layers == 4
    local, _, _ = check_config(ExtractConfig(model=folder, inputs=(str(corpus),), output=str(tmp_path / "out")))
    assert local.model == folder  # a local folder is passed on as it is
