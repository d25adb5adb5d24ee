"""Spread ``synthesize`` over a Ray cluster: one task per group of cases, written by the driver as they finish.

Case ``i`` depends only on the request and ``i`` (its features, background and seeds), so a task can
run anywhere and the dataset equals the single-machine one. Workers need the package and, for
``--from``, the source dataset at the same path; the driver writes every file.

Example:
    >>> for results in ray_case_groups(request, [[0, 1], [2, 3]], device=None, address="local"):  # doctest: +SKIP
    ...     print([row["case_id"] for *_, row in results])
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

from lsdm_aug.synthesis.dataset import CaseResult, SynthesisRequest, synthesize_group

__all__ = ["ray_case_groups", "init_ray"]


def init_ray(address: str) -> bool:
    """Connect to the Ray cluster at ``address`` ("auto", "ray://host:10001", ...) or start a local one ("local").

    Returns whether this call started Ray (then the caller shuts it down)."""
    try:
        import ray
    except ImportError:
        raise ConnectionError("--ray needs Ray: pip install -c constraints.txt 'lsdm-aug[ray]'") from None
    if ray.is_initialized():
        return False
    _check_reachable(address)
    try:
        ray.init(address=None if address == "local" else address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    except ConnectionError as error:
        raise ConnectionError(f"--ray {address!r}: no Ray cluster there ({error}); start one with `ray start --head`"
                              " or use --ray local") from None
    return True


def _check_reachable(address: str) -> None:
    """Fail at once on a host:port nobody listens on (Ray itself retries for minutes)."""
    if address in ("local", "auto"):
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ConnectionError(f"--ray {address!r} must be 'auto', 'local', host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise ConnectionError(f"--ray {address!r}: no Ray cluster there ({error.strerror or error}); start one with "
                              "`ray start --head` or use --ray local") from None


def _run_group(request: SynthesisRequest, indices: list[int], device: str | None) -> list[CaseResult]:
    return synthesize_group(request, indices, device)


def ray_case_groups(request: SynthesisRequest, groups: list[list[int]], device: str | None,
                    address: str) -> Iterator[list[CaseResult]]:
    """Run each group of case indices as a Ray task (1 CPU, or 1 GPU when ``device`` is CUDA); yield results
    in the order they finish. Connects first when Ray is not initialised (see :func:`init_ray`)."""
    import ray

    init_ray(address)
    gpus = 1 if device is not None and device.startswith("cuda") else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_run_group)
    pending = [task.remote(request, group, device) for group in groups]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])
