"""Checkpoints: safetensors + JSON, never unpickled; every failure names the file and the mismatch."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

import lsdm_aug
from lsdm_aug.config import AutoencoderConfig
from lsdm_aug.models.autoencoder import build_autoencoder
from lsdm_aug.models.checkpoint import (CheckpointError, config_path, load_training_state, load_weights, read_config,
                                        save_training_state, save_weights)


def autoencoder(channels):
    return build_autoencoder(AutoencoderConfig(channels=channels, norm_num_groups=8))


def test_weights_round_trip_gives_equal_tensors_and_the_config(tmp_path):
    torch.manual_seed(0)
    source, target = autoencoder((8, 16, 16)), autoencoder((8, 16, 16))
    path = tmp_path / "autoencoder.safetensors"
    save_weights(path, source, {"scale_factor": 0.5, "channels": [8, 16, 16]})
    assert path.is_file() and config_path(path) == tmp_path / "autoencoder.json"
    assert read_config(path) == {"scale_factor": 0.5, "channels": [8, 16, 16]}
    assert load_weights(path, target)["scale_factor"] == 0.5
    expected = source.state_dict()
    for key, value in target.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_weights_of_a_ddp_like_wrapper_are_saved_without_the_prefix(tmp_path):
    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    layer = torch.nn.Linear(3, 2)
    save_weights(tmp_path / "w.safetensors", Wrapper(layer), {})
    other = torch.nn.Linear(3, 2)
    load_weights(tmp_path / "w.safetensors", other)
    assert torch.equal(other.weight, layer.weight)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_weight_file_is_named(tmp_path, damage):
    path = tmp_path / "unet.safetensors"
    save_weights(path, torch.nn.Linear(16, 16), {})
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a safetensors file at all" * 3, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_weights(path, torch.nn.Linear(16, 16))


def test_a_missing_weight_file_is_named(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_weights(path, torch.nn.Linear(2, 2), {})
    path.unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*missing"):
        load_weights(path, torch.nn.Linear(2, 2))


def test_a_missing_or_broken_json_is_named(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_weights(path, torch.nn.Linear(2, 2), {"a": 1})
    config_path(path).write_text("{not json")
    with pytest.raises(CheckpointError, match=re.escape(str(config_path(path)))):
        load_weights(path, torch.nn.Linear(2, 2))
    config_path(path).unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(config_path(path))) + ".*missing"):
        load_weights(path, torch.nn.Linear(2, 2))
    with pytest.raises(CheckpointError, match="missing"):
        read_config(path)


def test_wrong_shapes_name_the_key_and_both_shapes(tmp_path):
    """Same layers, other widths: (8, 16, 16) weights into a (16, 32, 32) autoencoder."""
    small, large = autoencoder((8, 16, 16)), autoencoder((16, 32, 32))
    path = tmp_path / "autoencoder.safetensors"
    save_weights(path, small, {})
    before = {k: v.clone() for k, v in large.state_dict().items()}
    with pytest.raises(CheckpointError) as error:
        load_weights(path, large)
    message = str(error.value)
    assert str(path) in message
    found = re.search(r"(\S+) has shape (\([\d, ]*\)), the model expects (\([\d, ]*\))", message)
    assert found, message
    key, got, expected = found.groups()
    assert got == str(tuple(small.state_dict()[key].shape))
    assert expected == str(tuple(large.state_dict()[key].shape))
    assert got != expected
    for name, value in large.state_dict().items():  # nothing was half-loaded
        assert torch.equal(value, before[name]), name


def test_other_widths_with_other_layers_name_the_extra_keys(tmp_path):
    """(8, 16, 16) has a channel-changing shortcut that (16, 16, 16) lacks: the keys, not shapes, differ."""
    path = tmp_path / "autoencoder.safetensors"
    save_weights(path, autoencoder((8, 16, 16)), {})
    with pytest.raises(CheckpointError) as error:
        load_weights(path, autoencoder((16, 16, 16)))
    message = str(error.value)
    assert str(path) in message and "AutoencoderKL" in message
    assert "4 unexpected keys" in message and "nin_shortcut" in message


def test_other_architectures_name_missing_and_unexpected_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, torch.nn.Linear(2, 2), {})
    with pytest.raises(CheckpointError, match=r"missing keys.*unexpected keys"):
        load_weights(path, torch.nn.Sequential(torch.nn.Linear(2, 2)))


def adam_setup(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def adam_step(model, optimizer, seed: int):
    generator = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(5, 4, generator=generator)).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_training_state_round_trip_restores_optimizer_and_meta(tmp_path):
    model, optimizer = adam_setup(0)
    for seed in range(3):
        adam_step(model, optimizer, seed)
    path = tmp_path / "state.safetensors"
    meta = {"step": 3, "history": [{"step": 3, "loss": 0.25}], "recipe": "phantom-smoke"}
    save_training_state(path, {"model": model}, {"model": optimizer}, meta)

    restored_model, restored_optimizer = adam_setup(1)  # different initial weights, empty optimizer
    assert load_training_state(path, {"model": restored_model}, {"model": restored_optimizer}) == meta
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)
    state, restored = optimizer.state_dict(), restored_optimizer.state_dict()
    assert state["state"].keys() == restored["state"].keys() and len(state["state"]) == 4
    for index, values in state["state"].items():
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(values[name]), torch.as_tensor(restored["state"][index][name])), name
    assert restored["param_groups"][0]["lr"] == 1e-2
    assert tuple(restored["param_groups"][0]["betas"]) == (0.9, 0.999)

    # and training continues exactly as if it had never stopped
    adam_step(model, optimizer, 7)
    adam_step(restored_model, restored_optimizer, 7)
    for a, b in zip(model.parameters(), restored_model.parameters()):
        assert torch.equal(a, b)


def test_training_state_without_the_optimizer_is_an_error(tmp_path):
    model, optimizer = adam_setup(0)
    path = tmp_path / "state.safetensors"
    save_training_state(path, {"model": model}, {}, {"step": 0})
    with pytest.raises(CheckpointError, match="'model'"):
        load_training_state(path, {"model": model}, {"model": optimizer})


def test_no_torch_load_without_weights_only():
    """Loading never unpickles: any ``torch.load`` in the package passes ``weights_only=True``."""
    offenders = []
    for source in Path(lsdm_aug.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(), filename=str(source))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                if not safe:
                    offenders.append(f"{source.name}:{node.lineno}")
    assert offenders == []
    for source in Path(lsdm_aug.__file__).parent.rglob("*.py"):
        assert not re.search(r"\bpickle\.loads?\(", source.read_text()), source


def test_the_weights_digest_tells_retrained_weights_apart(copy_models, smoke_models):
    from safetensors.torch import load_file, save_file

    from lsdm_aug.models.checkpoint import weights_digest

    copy = copy_models()
    assert weights_digest(copy) == weights_digest(smoke_models)  # the same weights, another folder
    (copy / "unet_state.safetensors").write_bytes(b"resumable state is not weights")
    assert weights_digest(copy) == weights_digest(smoke_models)
    tensors = load_file(copy / "unet.safetensors")
    name = next(iter(tensors))
    tensors[name] = tensors[name] + 1e-3  # "retrained": same name, same step counts, other weights
    save_file(tensors, copy / "unet.safetensors", metadata={"format": "pt"})
    assert weights_digest(copy) != weights_digest(smoke_models)


def test_the_weights_digest_tells_another_default_guidance_scale_apart(copy_models, smoke_models):
    import json

    from lsdm_aug.models.checkpoint import weights_digest

    copy = copy_models()
    config = json.loads((copy / "unet.json").read_text())
    config["default_cfg_scale"] = 2.0  # the same weights, another default: other nodules by default
    (copy / "unet.json").write_text(json.dumps(config))
    changed = weights_digest(copy)
    assert changed != weights_digest(smoke_models)
    config["default_cfg_scale"] = 3.0
    (copy / "unet.json").write_text(json.dumps(config))
    assert weights_digest(copy) not in (changed, weights_digest(smoke_models))
    explicit = ("default_cfg_scale",)  # for work that passes every guidance scale itself
    assert weights_digest(copy, leave_out=explicit) == weights_digest(smoke_models, leave_out=explicit)
    config["edit_window_px"] = 32  # another window edits other pixels: not left out
    (copy / "unet.json").write_text(json.dumps(config))
    assert weights_digest(copy, leave_out=explicit) != weights_digest(smoke_models, leave_out=explicit)
    with pytest.raises(ValueError, match=r"leave_out names \['steps'\], not among the making defaults"):
        weights_digest(copy, leave_out=("steps",))
