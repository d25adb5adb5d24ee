"""Checkpoints as safetensors with a JSON config beside each: loading never unpickles.

``save_weights(path, module, config)`` writes ``path`` (``.safetensors``) and ``path`` with
``.json`` (the component's config and any extra fields such as the latent scale factor). A training
state adds the optimizer: its tensors go into the safetensors file under ``optimizer.*`` and its
structure into the JSON.

Example:
    >>> import torch
    >>> layer = torch.nn.Linear(2, 2)
    >>> save_weights("/tmp/layer.safetensors", layer, {"kind": "linear"})
    >>> load_weights("/tmp/layer.safetensors", torch.nn.Linear(2, 2))["kind"]
    'linear'
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "module_digest", "save_weights", "load_weights", "load_matching_weights", "read_config",
           "save_training_state", "load_training_state", "config_path", "resolve_model_dir", "SHIPPED_MODELS_DIR",
           "DEFAULT_MODEL", "shipped_models", "save_half_precision", "weights_digest", "save_tensors", "load_tensors"]

SHIPPED_MODELS_DIR = Path(__file__).resolve().parent / "shipped"
DEFAULT_MODEL = "phantom-512"
# Keys of a U-Net's config that change what the model makes, chosen after training by measurement: the default
# classifier-free guidance scale and the default edit window (image side in model pixels of a local edit).
MAKING_DEFAULTS = ("default_cfg_scale", "edit_window_px")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model; the message names the file and the mismatch."""


def config_path(weights_path: str | Path) -> Path:
    return Path(weights_path).with_suffix(".json")


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; weights are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)  # DistributedDataParallel


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _atomic(config_path(path), lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2, default=str)))


def save_weights(path: str | Path, module: torch.nn.Module, config: dict[str, Any]) -> None:
    """Write ``module``'s weights (safetensors) and ``config`` (JSON beside them), each atomically."""
    _save(Path(path), dict(_unwrap(module).state_dict()), config)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Write named tensors that are not a module's weights (e.g. cached latents) and ``config``, each atomically."""
    _save(Path(path), tensors, config)


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors :func:`save_tensors` wrote (never unpickled).

    Raises:
        CheckpointError: the file is missing or not a safetensors file.
    """
    return _read_tensors(Path(path))


def read_config(path: str | Path) -> dict[str, Any]:
    """The JSON config beside a weights file."""
    json_path = config_path(path)
    if not json_path.is_file():
        raise CheckpointError(f"checkpoint config {str(json_path)!r} is missing")
    try:
        return json.loads(json_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint config {str(json_path)!r} is not valid JSON: {error}") from error


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt or not a safetensors file: {error}") from error


def _load_state(path: Path, module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    target = _unwrap(module)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit {type(target).__name__}: "
                              f"{len(missing)} missing keys (e.g. {missing[:2]}), "
                              f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"checkpoint {str(path)!r} does not fit {type(target).__name__}: {key} has shape "
                                  f"{tuple(value.shape)}, the model expects {tuple(expected[key].shape)}")
    target.load_state_dict(tensors)


def load_weights(path: str | Path, module: torch.nn.Module) -> dict[str, Any]:
    """Load weights into ``module`` (shapes and keys checked) and return the config beside them."""
    path = Path(path)
    config = read_config(path)
    _load_state(path, module, _read_tensors(path))
    return config


def load_matching_weights(path: str | Path, module: torch.nn.Module) -> list[str]:
    """Warm start: load every tensor of ``path`` whose key and shape ``module`` has; a table that has gained rows
    (the same key and trailing shape, more rows: a feature embedding with a feature appended) gets the source's
    rows first, the new ones keeping their initial values. Returns the keys of ``module`` left wholly at their
    initial values (e.g. a feature embedding the source net lacks)."""
    path = Path(path)
    tensors = _read_tensors(path)
    target = _unwrap(module)
    expected = target.state_dict()
    usable = {k: v for k, v in tensors.items() if k in expected and v.shape == expected[k].shape}
    for key, value in tensors.items():
        grown = expected.get(key)
        if (key not in usable and grown is not None and value.ndim == grown.ndim >= 1
                and value.shape[1:] == grown.shape[1:] and value.shape[0] < grown.shape[0]):
            usable[key] = torch.cat([value.to(grown.dtype), grown[value.shape[0]:]])
    if not usable:
        raise CheckpointError(f"checkpoint {str(path)!r} shares no weights with {type(target).__name__}")
    target.load_state_dict(usable, strict=False)
    return sorted(set(expected) - set(usable))


def save_half_precision(source: str | Path, target: str | Path) -> None:
    """Copy a weights file (and its JSON config) with float32 tensors stored as float16, to ship it at half the
    size; :func:`load_weights` loads it into float32 modules as usual.

    Example:
        >>> import torch
        >>> save_weights("/tmp/full.safetensors", torch.nn.Linear(2, 2), {"kind": "linear"})
        >>> save_half_precision("/tmp/full.safetensors", "/tmp/half.safetensors")
        >>> load_weights("/tmp/half.safetensors", torch.nn.Linear(2, 2))["stored_dtype"]
        'float16'
    """
    tensors = {k: v.half() if v.dtype == torch.float32 else v for k, v in _read_tensors(Path(source)).items()}
    _save(Path(target), tensors, {**read_config(source), "stored_dtype": "float16"})


def weights_digest(folder: str | Path, length: int = 8, leave_out: tuple[str, ...] = ()) -> str:
    """A short SHA-256 over a model folder's weight files (training states left out), the classifiers' calibrated
    guidance targets and the U-Net's defaults that change what it makes (:data:`MAKING_DEFAULTS`, when set): two folders
    with the same name and step counts but other weights, targets or defaults get other digests, so nothing keyed
    on a model mistakes one for the other. ``leave_out``: defaults not counted (e.g. ``("default_cfg_scale",)``
    for work that passes every guidance scale explicitly).

    Example:
        >>> len(weights_digest(resolve_model_dir("default")))
        8
    """
    unknown = set(leave_out) - set(MAKING_DEFAULTS)
    if unknown:
        raise ValueError(f"leave_out names {sorted(unknown)}, not among the making defaults {MAKING_DEFAULTS}")
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        if not path.name.endswith("_state.safetensors"):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
            config = _config_or_empty(path)  # guidance targets and defaults change what the model makes
            if config.get("calibration") is not None:
                digest.update(json.dumps(config["calibration"], sort_keys=True).encode())
            for key in MAKING_DEFAULTS:
                if key not in leave_out and config.get(key) is not None:
                    digest.update(json.dumps({key: config[key]}).encode())
    return digest.hexdigest()[:length]


def _config_or_empty(weights_path: Path) -> dict[str, Any]:
    """The JSON config beside a weights file, or {} when it is missing or unreadable."""
    try:
        return json.loads(config_path(weights_path).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def module_digest(module: torch.nn.Module, *extra: Any, length: int = 8) -> str:
    """A short SHA-256 over a module's state (and ``extra`` values, e.g. a latent scale factor): what a result
    computed from that module alone can be keyed on.

    Example:
        >>> module_digest(torch.nn.Linear(2, 2)) == module_digest(torch.nn.Linear(2, 2))  # other random weights
        False
    """
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps(extra, default=str).encode())
    return digest.hexdigest()[:length]


def shipped_models() -> list[str]:
    """Names of the model folders shipped in the package."""
    return sorted(p.name for p in SHIPPED_MODELS_DIR.iterdir() if p.is_dir()) if SHIPPED_MODELS_DIR.is_dir() else []


def resolve_model_dir(name_or_path: str | Path) -> Path:
    """``"default"``, a shipped model's name (``phantom-128``, ...) or a model folder -> the folder.

    Raises:
        CheckpointError: neither a shipped name nor an existing folder (the message lists the shipped names).

    Example:
        >>> resolve_model_dir("default").name == DEFAULT_MODEL
        True
    """
    name = DEFAULT_MODEL if str(name_or_path) == "default" else str(name_or_path)
    if name in shipped_models():
        return SHIPPED_MODELS_DIR / name
    folder = Path(name_or_path)
    if not folder.is_dir():
        raise CheckpointError(f"model {str(name_or_path)!r} is neither 'default', a shipped model "
                              f"({', '.join(shipped_models())}) nor a model folder")
    return folder


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            key = f"{param_id}.{name}"
            if torch.is_tensor(value):
                tensors[f"optimizer.{key}"] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.removeprefix("optimizer.").split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    for key, value in structure["scalars"].items():
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": structure["param_groups"]}


def save_training_state(path: str | Path, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], meta: dict[str, Any]) -> None:
    """Everything needed to resume: every module's weights, every optimizer, and ``meta`` (step, config, RNG)."""
    tensors: dict[str, torch.Tensor] = {}
    structure: dict[str, Any] = {"meta": meta, "optimizers": {}}
    for name, module in modules.items():
        tensors.update({f"{name}/{k}": v for k, v in _unwrap(module).state_dict().items()})
    for name, optimizer in optimizers.items():
        flat, info = _flatten_optimizer(optimizer)
        tensors.update({f"{name}/{k}": v for k, v in flat.items()})
        structure["optimizers"][name] = info
    _save(Path(path), tensors, structure)


def load_training_state(path: str | Path, modules: dict[str, torch.nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore what :func:`save_training_state` wrote and return its ``meta``."""
    path = Path(path)
    structure = read_config(path)
    tensors = _read_tensors(path)
    for name, module in modules.items():
        prefix = f"{name}/"
        _load_state(path, module, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)
                                   and not k[len(prefix):].startswith("optimizer.")})
    for name, optimizer in optimizers.items():
        prefix = f"{name}/"
        flat = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix + "optimizer.")}
        if name not in structure.get("optimizers", {}):
            raise CheckpointError(f"checkpoint {str(path)!r} has no optimizer {name!r}")
        optimizer.load_state_dict(_unflatten_optimizer(flat, structure["optimizers"][name]))
    return structure["meta"]
