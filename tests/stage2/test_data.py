"""Stage-2 data: codes published to the Hub stream without a download."""

import pytest
import torch

from vqgen.cli import VqgenError


def hub_as_local_files(remote, monkeypatch):
    """hf:// paths served from the fake Hub's folders (the network boundary datasets' streaming reads through)."""
    import importlib

    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    registry = importlib.import_module("fsspec.registry")  # the module (fsspec.registry is its read-only view)

    class HubFiles(LocalFileSystem):
        protocol = "hf"

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path).removeprefix("hf://")
            if path.startswith("datasets/"):
                path = str(remote / "dataset" / path.removeprefix("datasets/"))
            elif not path.startswith("/"):
                path = "/" + path  # a local path handed back as hf://tmp/... by unstrip_protocol
            return super()._strip_protocol(path)

    monkeypatch.setitem(registry._registry, "hf", HubFiles)
    monkeypatch.setattr(fsspec.AbstractFileSystem, "_cache", {}, raising=False)


@pytest.mark.slow  # subprocesses or a compilation: seconds each
def test_codes_published_to_the_hub_stream_without_a_download(stage1, tmp_path, fake_hub, monkeypatch):
    from stage1_vqvae.extract import publish_codes
    from stage2_prior.data import CodeDataConfig, StreamingCodes, load_code_splits
    from vqgen.codes import load_code_dataset

    _, _, codes = stage1
    publish_codes(codes, "me/codes")
    hub_as_local_files(tmp_path / "remote", monkeypatch)
    local, _, _ = load_code_splits(CodeDataConfig(codes=str(codes)))
    cfg = CodeDataConfig(codes="me/codes", streaming=True, shuffle_buffer=1, streaming_eval_rows=3)
    streamed, meta, _ = load_code_splits(cfg, splits=("train", "validation"))
    assert meta == load_code_dataset(codes)[1]
    assert torch.equal(streamed["validation"].input_ids, local["validation"].input_ids[:3])
    train = streamed["train"]
    assert isinstance(train, StreamingCodes)
    first = next(iter(train.configure(batch_size=4, rank=0, world=1)))["input_ids"]
    assert torch.equal(first, local["train"].input_ids[:4])  # one shard, no buffer: the file's order
    with pytest.raises(VqgenError, match="cannot read its vqgen_codes.json from the Hub"):
        load_code_splits(CodeDataConfig(codes="me/nothing", streaming=True))
