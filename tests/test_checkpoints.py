"""Checkpoints are data: reading, unwrapping, checked loading and the APT-only freeze (no framework)."""
import collections
import os
import pickle
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from apt_dense import APTViT
from apt_dense.checkpoints import (
    UnsafeCheckpointError,
    load_state_dict_checked,
    read_checkpoint,
    state_dict_tensors,
    unwrap_state_dict,
)
from apt_dense.param_groups import freeze_all_but_apt_layers


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo unpickled code ran",))


def tiny(**kwargs):
    return APTViT(img_size=64, embed_dim=32, depth=1, num_heads=2, thresholds={32: 5.0}, **kwargs)


def test_torch_files_with_tensors_arrays_and_numbers_read(tmp_path):
    path = tmp_path / "c.pth"
    torch.save({"model": {"w": torch.ones(2)}, "iteration": 3, "array": np.arange(3), "scalar": np.float32(2)}, path)
    data = read_checkpoint(path)
    assert torch.equal(data["model"]["w"], torch.ones(2)) and data["iteration"] == 3
    assert data["array"].tolist() == [0, 1, 2] and data["scalar"] == 2


def test_legacy_pkl_with_numpy_arrays_reads(tmp_path):
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": collections.OrderedDict(w=np.ones(2, np.float32)), "__author__": "x"}, f, protocol=2)
    assert read_checkpoint(path)["model"]["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_files_that_would_run_code_are_refused_unless_allowed(tmp_path, suffix, capfd):
    path = tmp_path / f"evil{suffix}"
    if suffix == ".pth":
        torch.save({"x": RunsCode()}, path)
    else:
        path.write_bytes(pickle.dumps({"x": RunsCode()}))
    with pytest.raises(UnsafeCheckpointError, match=r"(?s)os.system|posix.system.*allow_pickle=True.*--unsafe-load"):
        read_checkpoint(path)
    assert "unpickled code ran" not in capfd.readouterr().out
    read_checkpoint(path, allow_pickle=True)
    assert "unpickled code ran" in capfd.readouterr().out


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated zip"], ids=["empty", "zip"])
@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_corrupt_files_give_a_clear_error(tmp_path, content, suffix):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a readable checkpoint: it is truncated, corrupt"):
        read_checkpoint(path)


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_random_bytes_give_a_clear_error(tmp_path, suffix):
    """Unpicklers fail on random bytes in many ways (IndexError, KeyError, ...): always one message."""
    path = tmp_path / f"random{suffix}"
    for seed in range(100):
        path.write_bytes(random.Random(seed).randbytes(2000))
        with pytest.raises(ValueError, match="not a readable checkpoint: it is truncated, corrupt"):
            read_checkpoint(path)


@pytest.mark.parametrize("keep", [0.5, 0.05, 30 / 4000], ids=["half", "short", "very-short"])
def test_truncated_torch_file(tmp_path, keep):
    path = tmp_path / "c.pth"
    torch.save({"w": torch.ones(1000)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(ValueError, match="truncated"):
        read_checkpoint(path)


def test_missing_file_and_non_dict(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save(torch.ones(2), tmp_path / "t.pth")
    with pytest.raises(ValueError, match="holds a Tensor"):
        read_checkpoint(tmp_path / "t.pth")


@pytest.mark.parametrize("wrapper", ["state_dict", "model", "module", None])
def test_unwrap_state_dict_and_ddp_prefix(wrapper):
    state = {"module.a": 1, "module.b": 2}
    checkpoint = state if wrapper is None else {wrapper: state, "meta": {}}
    assert unwrap_state_dict(checkpoint) == {"a": 1, "b": 2}


def test_checked_loading_reports_apt_layers_and_raises_on_shapes(caplog):
    source = tiny()
    state = {k: v for k, v in source.state_dict().items() if "patch_embed.detail" not in k and "downsample" not in k}
    state["rope.freqs_cos"] = torch.zeros(3)
    model = tiny()
    with caplog.at_level("INFO"):
        missing, unexpected = load_state_dict_checked(model, state)
    assert (missing, unexpected) == ([], [])
    assert "APT layers not in the checkpoint" in caplog.text
    for key, value in state.items():
        if "rope" not in key:
            assert torch.equal(model.state_dict()[key], value), key
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(7, 32)
    state["pos_embed"] = torch.zeros(1, 5, 32)
    with pytest.raises(ValueError, match="shape mismatch") as err:
        load_state_dict_checked(model, state)
    assert "blocks.0.mlp.fc1.weight: checkpoint (7, 32)" in str(err.value) and "pos_embed: checkpoint (1, 5, 32)" in str(err.value)


def test_numpy_state_dicts_load_like_tensors(tmp_path):
    # a legacy .pkl (detectron2's model zoo) holds numpy arrays: they load as the same weights
    source = tiny()
    path = tmp_path / "model_final.pkl"
    with path.open("wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in source.state_dict().items()}, "__author__": "x"}, f)
    state = unwrap_state_dict(read_checkpoint(path))
    state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"][:, ::-1]  # a negative-stride view
    state["pos_embed"].flags.writeable = False
    model = tiny()
    assert load_state_dict_checked(model, state) == ([], [])
    for key, value in model.state_dict().items():
        assert torch.equal(value, torch.tensor(np.array(state[key]))), key
    assert state_dict_tensors({"n": np.int64(3)})["n"].item() == 3


@pytest.mark.parametrize(
    "state, match",
    [
        ({0: torch.zeros(1)}, r"keys must be parameter names \(str.*got 0 \(int\)"),
        ({"w": [1.0, 2.0]}, r"entry 'w' is a list .* not a tensor or numpy array.*unwrap_state_dict"),
        ({"meta": {"iter": 3}}, r"entry 'meta' is a dict"),
        ({"w": np.array(["a"])}, r"entry 'w' is a numpy array of <U1, not of numbers"),
        (None, r"a state dict maps parameter names to tensors, got NoneType"),
        ([("w", torch.zeros(1))], r"a state dict maps parameter names to tensors, got list"),
    ],
)
def test_state_dicts_that_are_not_tensors_are_a_clear_error(state, match):
    with pytest.raises(TypeError, match=match):
        load_state_dict_checked(tiny(), state)


def test_freeze_all_but_apt_layers_keeps_batch_norm_statistics():
    model = nn.ModuleDict({"backbone": tiny(), "head": nn.Sequential(nn.Conv2d(32, 4, 1), nn.BatchNorm2d(4))})
    trainable = freeze_all_but_apt_layers(model)
    assert trainable and all("patch_embed.detail" in n or "patch_embed.downsample" in n for n in trainable)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(trainable)
    model.train()
    bn = model["head"][1]
    before = bn.running_mean.clone()
    bn(torch.randn(2, 4, 3, 3) + 5)
    assert not bn.training and torch.equal(bn.running_mean, before)
    with pytest.raises(ValueError, match="no APT layers"):
        freeze_all_but_apt_layers(nn.Linear(2, 2))
