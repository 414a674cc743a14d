"""Joining or starting Ray, failing fast and plainly when the cluster cannot be reached.

Left to itself, ``ray.init(address=...)`` retries the GCS for minutes when nothing listens
there (20 tries of up to ~35 s each in Ray 2.60), and for 20 s when the GCS refuses the
client's token, printing a warning each second either way. So the address is checked first,
within ``runtime.timeout_s``: a TCP connection (refused at once where nothing listens, silent
where a firewall drops it), then the GCS handshake that ``ray.init`` would do, which a cluster
with token authentication refuses at once for a wrong or missing ``RAY_AUTH_TOKEN``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator

from decoupled.build import num_stages
from decoupled.config import Config, ConfigError
from decoupled.factories import code_paths

CHECK = "check runtime.address (the head's GCS, HOST:PORT; `ray start --head` prints it), that "
CHECK += "the head is running and the port open, and RAY_AUTH_TOKEN (the cluster's token)"


class ClusterUnreachable(RuntimeError):
    """The configured cluster did not answer, or refused this client (exit 1)."""


def init_ray(cfg: Config) -> bool:
    """Join or start Ray as configured; True when this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        return False
    # The user's model or data code (model.name / data.name "module:function") goes with the
    # job to every node; an installed package is already there.
    modules = code_paths([cfg.model.name, cfg.data.name])
    runtime_env = {"py_modules": modules} if modules else None
    if cfg.runtime.address:
        check_cluster(cfg.runtime.address, cfg.runtime.timeout_s)
        ray.init(
            address=cfg.runtime.address, runtime_env=runtime_env, logging_level=logging.WARNING
        )
        return True
    # Logical CPUs: enough for every stage even on a small box (each actor sets its threads).
    cpus = max(os.cpu_count() or 1, math.ceil(num_stages(cfg) * cfg.runtime.cpus_per_stage))
    # address="local": start our own, even where another cluster is registered on this host.
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        runtime_env=runtime_env,
        logging_level=logging.WARNING,
    )
    return True


def check_cluster(address: str, timeout_s: float) -> None:
    """Raise ClusterUnreachable unless a Ray GCS at ``address`` accepts this client within
    ``timeout_s``; ConfigError for an address that is not one."""
    if address.startswith("ray://"):
        return  # Ray Client: another protocol, with its own bounded connect
    deadline = time.monotonic() + timeout_s
    gcs = _resolve(address)
    host, _, port = gcs.rpartition(":")
    where = address if gcs == address else f"{address} ({gcs})"
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s):
            pass
    except TimeoutError:
        raise ClusterUnreachable(
            f"nothing answered at {where} within {timeout_s:g}s; {CHECK}"
        ) from None
    except OSError as err:  # refused, unreachable network, unknown host
        reason = err.strerror or str(err)
        raise ClusterUnreachable(f"nothing answered at {where} ({reason}); {CHECK}") from None
    _handshake(gcs, where, max(deadline - time.monotonic(), 1.0), timeout_s)


def _resolve(address: str) -> str:
    """HOST:PORT of the GCS that ``ray.init(address=address)`` would join."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        gcs = canonicalize_bootstrap_address(address)
    except ConnectionError as err:  # "auto" and no cluster on this machine
        raise ClusterUnreachable(f"runtime.address={address}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"runtime.address: {err}; expected HOST:PORT, auto or ray://") from None
    if gcs is None or not gcs.rpartition(":")[2].isdigit():
        raise ConfigError(f"runtime.address: {address!r} is not HOST:PORT, auto or ray://")
    return gcs


def _handshake(gcs: str, where: str, timeout_s: float, budget_s: float) -> None:
    """The GCS handshake of ``ray.init``, bounded: Ray's own does not keep to its timeout
    when the peer is not a GCS, so it runs on a thread that is abandoned at the deadline."""
    from ray._raylet import InnerGcsClient  # type: ignore[attr-defined]
    from ray.exceptions import AuthenticationError

    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            InnerGcsClient.standalone(gcs, None, int(timeout_s * 1000))
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    thread = threading.Thread(target=connect, name="gcs-handshake", daemon=True)
    with _quiet_stderr():  # Ray's C++ logs a warning per failed try; the error below says it
        thread.start()
        thread.join(timeout_s)
    if not outcome:
        raise ClusterUnreachable(
            f"{where} accepted a connection but did not answer as a Ray cluster within "
            f"{budget_s:g}s; {CHECK}"
        )
    err = outcome[0]
    if isinstance(err, AuthenticationError):
        raise ClusterUnreachable(
            f"the Ray cluster at {where} refused this client's token ({err}); set "
            "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN to the token the cluster was started with"
        )
    if err is not None:
        raise ClusterUnreachable(f"{where} did not answer as a Ray cluster ({err}); {CHECK}")


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """File descriptor 2 to /dev/null: Ray's C++ writes there, past ``sys.stderr``."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
