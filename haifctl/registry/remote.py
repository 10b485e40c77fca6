"""The registry through the registry daemon: what the CLI uses while a cluster is up.

Same methods as :class:`haifctl.registry.service.Registry` for what the CLI needs.  Reading and
hashing a model file happen here (with the caller's progress bar); the daemon records the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import zmq

from haifctl import wire
from haifctl.gguf_info import GGUFFacts, read_facts
from haifctl.hashing import sha256_file
from haifctl.registry.service import ModelRecord
from haifctl.registry.usage import Group, UsageTotal
from haifctl.rpc import RpcClient
from haifctl.security import Keyring


class RemoteRegistry:
    def __init__(self, address: str, keyring: Keyring, timeout: float = 10.0) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.rpc = RpcClient(self.ctx, address, "registry", keyring)
        self.timeout = timeout

    def __enter__(self) -> RemoteRegistry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.rpc.close()
        self.ctx.destroy(linger=0)

    def _call(self, op: str, **args: Any) -> Any:
        return self.rpc.ask(
            wire.RegistryCall(op=op, args=args), wire.RegistryReply, self.timeout
        ).result

    def _record(self, op: str, **args: Any) -> ModelRecord:
        return msgspec.convert(self._call(op, **args), ModelRecord)

    def _records(self, op: str, **args: Any) -> list[ModelRecord]:
        return msgspec.convert(self._call(op, **args), list[ModelRecord])

    def all(self) -> list[ModelRecord]:
        return self._records("list")

    def resolve(self, ref: str) -> ModelRecord:
        return self._record("resolve", ref=ref)

    def ensure_builtin(self) -> ModelRecord:
        return self._record("ensure_builtin")

    def register(
        self,
        path: Path,
        *,
        name: str,
        version: str | None = None,
        aliases: Iterable[str] = (),
        params: Mapping[str, Any] | None = None,
        make_default: bool = False,
        progress: Callable[[int], None] | None = None,
        facts: GGUFFacts | None = None,
    ) -> ModelRecord:
        path = path.expanduser().resolve()
        facts = facts or read_facts(path)
        digest = sha256_file(path, progress)
        return self._record(
            "register",
            path=str(path),
            name=name,
            version=version,
            aliases=list(aliases),
            params=dict(params or {}),
            make_default=make_default,
            sha256=digest,
            facts=msgspec.to_builtins(facts),
        )

    def remove(self, ref: str, *, all_versions: bool = False) -> list[ModelRecord]:
        return self._records("remove", ref=ref, all_versions=all_versions)

    def set_alias(self, alias: str, ref: str) -> ModelRecord:
        return self._record("set_alias", alias=alias, ref=ref)

    def remove_alias(self, alias: str) -> None:
        self._call("remove_alias", alias=alias)

    def set_default(self, ref: str) -> ModelRecord:
        return self._record("set_default", ref=ref)

    def set_params(
        self, ref: str, params: Mapping[str, Any], unset: Iterable[str] = ()
    ) -> ModelRecord:
        return self._record("set_params", ref=ref, params=dict(params), unset=list(unset))

    def set_status(self, ref: str, status: str) -> ModelRecord:
        return self._record("set_status", ref=ref, status=status)

    def usage(self, since_s: float | None = None, by: Group | None = None) -> list[UsageTotal]:
        return msgspec.convert(self._call("usage", since_s=since_s, by=by), list[UsageTotal])
