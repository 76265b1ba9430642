from pathlib import Path

import pytest

from runtime.gguf_file import ModelFileError, check_model_file, inspect_gguf


def test_tiny_model_inspected(tiny_gguf: Path):
    info = check_model_file(tiny_gguf)
    assert info.architecture == "llama"
    assert info.file_type == "model"
    assert info.block_count == 2
    assert info.context_length == 512
    assert info.tensor_count == 2 + 2 * 9 + 1


def test_missing_file_named(tmp_path: Path):
    missing = tmp_path / "nope.gguf"
    with pytest.raises(ModelFileError, match=f"model file {missing} does not exist"):
        check_model_file(missing)


def test_not_gguf_named(tmp_path: Path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(ModelFileError, match=rf"{fake} is not a GGUF file .*b'PK\\x03\\x04'"):
        check_model_file(fake)


def test_empty_file_rejected(tmp_path: Path):
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelFileError, match="0 bytes, too short"):
        check_model_file(empty)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.999])
def test_truncated_tensor_data_detected(tmp_path: Path, tiny_gguf: Path, keep_fraction: float):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(ModelFileError, match=f"{cut} is truncated"):
        check_model_file(cut)


def test_truncated_header_detected(tmp_path: Path, tiny_gguf: Path):
    cut = tmp_path / "header.gguf"
    cut.write_bytes(tiny_gguf.read_bytes()[:300])
    with pytest.raises(ModelFileError, match=f"{cut} is truncated or malformed"):
        check_model_file(cut)


def test_folder_rejected(tmp_path: Path):
    with pytest.raises(ModelFileError, match="is not a file"):
        check_model_file(tmp_path)


def test_adapter_refused_as_model(tmp_path: Path):
    import gguf
    import numpy as np

    path = tmp_path / "adapter.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_tensor("blk.0.attn_v.weight.lora_a", np.zeros((2, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert inspect_gguf(path).file_type == "adapter"
    with pytest.raises(ModelFileError, match="is a GGUF adapter .* not a model"):
        check_model_file(path)


def test_scan_matches_gguf_reader(tiny_gguf: Path):
    import gguf

    reference = gguf.GGUFReader(tiny_gguf, "r")
    info = inspect_gguf(tiny_gguf)
    assert [t.name for t in info.tensors] == [t.name for t in reference.tensors]
    assert [t.offset for t in info.tensors] == [int(t.data_offset) for t in reference.tensors]
    assert [t.n_bytes for t in info.tensors] == [int(t.n_bytes) for t in reference.tensors]
    assert info.metadata["llama.embedding_length"] == 64
    assert len(info.metadata["tokenizer.ggml.tokens"]) == len(
        reference.fields["tokenizer.ggml.tokens"].data
    )


def duplicate_token_model(path: Path, monkeypatch) -> Path:
    import bench.tiny_model as tiny

    tokens, scores, types = tiny.tiny_vocabulary()
    tokens[-1] = tokens[-2]
    monkeypatch.setattr(tiny, "tiny_vocabulary", lambda: (tokens, scores, types))
    return tiny.write_tiny_gguf(path)


def test_duplicate_tokens_refused(tmp_path: Path, monkeypatch):
    path = duplicate_token_model(tmp_path / "dup.gguf", monkeypatch)
    with pytest.raises(ModelFileError, match="'tokenizer.ggml.tokens' lists 1 duplicate token"):
        inspect_gguf(path)


def test_llama_abort_caught_in_child(tmp_path: Path, monkeypatch):
    # llama.cpp aborts the process on duplicate tokens; the probe runs the load in a
    # child process so that only the child dies.
    from runtime.loader import ModelInfo, probe_once

    path = duplicate_token_model(tmp_path / "dup.gguf", monkeypatch)
    model = ModelInfo(path, "dup", None, False)
    with pytest.raises(
        ModelFileError,
        match=r"llama.cpp failed to load .*dup.gguf in a test "
        r"process \(signal 6",
    ):
        probe_once(model, tmp_path / "cache")
    assert not (tmp_path / "cache" / "verified").exists()


def test_unsupported_version_named(tmp_path: Path, tiny_gguf: Path):
    data = bytearray(tiny_gguf.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    path = tmp_path / "v7.gguf"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="is GGUF version 7; A3X reads versions 2, 3"):
        inspect_gguf(path)
