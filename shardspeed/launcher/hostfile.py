"""Hostfiles and the resource filters of the launcher (`--include`, `--exclude`, `--num_nodes`,
`--num_gpus`).

A hostfile is MPI style, one host a line: `worker-1 slots=8`. `#` starts a comment; blank lines
are skipped. The resources of a run are an ordered mapping host -> slot ids (on a GPU node a slot
id is a device id; on a CPU node it only counts processes). The filters take such a mapping and
return a new one; they never change their input.
"""
from __future__ import annotations

import re
from pathlib import Path

Resources = dict[str, list[int]]
"""host -> slot ids, in hostfile order (node rank = position)."""

_HOST_LINE = re.compile(r"^(?P<host>\S+)\s+slots=(?P<slots>\S+)$")
_HOSTFILE_FORMAT = "expected `HOST slots=N`, e.g. `worker-1 slots=8`"


class LauncherError(ValueError):
    """Something the user passed to the launcher is wrong; the message names the flag, file or line."""


def parse_hostfile(path: str | Path) -> Resources:
    """Read a hostfile into host -> [0, ..., slots-1]; raise naming the file and line on a bad one."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise LauncherError(f"cannot read hostfile {path} (-H/--hostfile): {err}") from err
    return parse_hostfile_text(text, source=str(path))


def parse_hostfile_text(text: str, source: str = "<hostfile>") -> Resources:
    """Parse hostfile text; `source` names the file in error messages."""
    resources: Resources = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        host, slots = _parse_host_line(line, f"{source}:{number}")
        if host in resources:
            raise LauncherError(f"{source}:{number}: host `{host}` is listed twice; list each host once")
        resources[host] = list(range(slots))
    if not resources:
        raise LauncherError(f"hostfile {source} names no hosts ({_HOSTFILE_FORMAT})")
    return resources


def _parse_host_line(line: str, where: str) -> tuple[str, int]:
    match = _HOST_LINE.match(line)
    if match is None:
        raise LauncherError(f"{where}: cannot parse `{line}`; {_HOSTFILE_FORMAT}")
    slots = match.group("slots")
    if not slots.isdigit() or int(slots) < 1:
        raise LauncherError(f"{where}: slots must be a positive integer, got `slots={slots}`")
    return match.group("host"), int(slots)


def parse_filter(spec: str, flag: str) -> dict[str, list[int] | None]:
    """Parse `host1:0,1@host2` into {host1: [0, 1], host2: None} (None = every slot)."""
    parsed: dict[str, list[int] | None] = {}
    for entry in spec.split("@"):
        host, sep, slot_text = entry.strip().partition(":")
        if not host or (sep and not slot_text):
            raise LauncherError(f"{flag} {spec!r}: bad entry {entry!r}; expected `host` or `host:0,1`")
        slots = _parse_slot_list(slot_text, flag, spec) if sep else None
        if host in parsed and (parsed[host] is None or slots is None):
            parsed[host] = None
        elif host in parsed:
            parsed[host] = sorted(set(parsed[host] or []) | set(slots or []))
        else:
            parsed[host] = slots
    return parsed


def _parse_slot_list(text: str, flag: str, spec: str) -> list[int]:
    items = [item.strip() for item in text.split(",")]
    if not all(item.isdigit() for item in items):
        raise LauncherError(f"{flag} {spec!r}: slots must be integers, got `{text}`")
    return sorted({int(item) for item in items})


def include(resources: Resources, spec: str) -> Resources:
    """Keep only the hosts (and slots) named in an `--include` spec, in hostfile order."""
    wanted = parse_filter(spec, "--include")
    _check_known(resources, wanted, "--include", spec)
    return {host: (slots if wanted[host] is None else list(wanted[host] or []))
            for host, slots in resources.items() if host in wanted}


def exclude(resources: Resources, spec: str) -> Resources:
    """Drop the hosts (and slots) named in an `--exclude` spec; a host left with no slots goes."""
    unwanted = parse_filter(spec, "--exclude")
    _check_known(resources, unwanted, "--exclude", spec)
    kept: Resources = {}
    for host, slots in resources.items():
        drop = unwanted.get(host, [])
        left = [] if drop is None else [slot for slot in slots if slot not in drop]
        if left:
            kept[host] = left
    return kept


def _check_known(resources: Resources, named: dict[str, list[int] | None], flag: str, spec: str) -> None:
    for host, slots in named.items():
        if host not in resources:
            raise LauncherError(f"{flag} {spec!r}: host `{host}` is not in the hostfile "
                                f"(known: {', '.join(resources)})")
        bad = [slot for slot in slots or [] if slot not in resources[host]]
        if bad:
            raise LauncherError(f"{flag} {spec!r}: host `{host}` has slots {resources[host]}, "
                                f"not {bad}")


def limit(resources: Resources, num_nodes: int | None, num_gpus: int | None,
          source: str = "the hostfile") -> Resources:
    """Keep the first `num_nodes` hosts and the first `num_gpus` slots of each; raise if short."""
    hosts = list(resources)
    if num_nodes is not None:
        if num_nodes < 1 or num_nodes > len(hosts):
            raise LauncherError(f"--num_nodes {num_nodes}: {source} has {len(hosts)} host(s)")
        hosts = hosts[:num_nodes]
    if num_gpus is None:
        return {host: list(resources[host]) for host in hosts}
    if num_gpus < 1:
        raise LauncherError(f"--num_gpus {num_gpus}: must be at least 1")
    for host in hosts:
        if num_gpus > len(resources[host]):
            raise LauncherError(f"--num_gpus {num_gpus}: {source} gives host `{host}` only "
                                f"{len(resources[host])} slot(s)")
    return {host: resources[host][:num_gpus] for host in hosts}


def select(resources: Resources, include_spec: str | None, exclude_spec: str | None,
           num_nodes: int | None, num_gpus: int | None, source: str = "the hostfile") -> Resources:
    """Apply the launcher's filters in DeepSpeed's order: include or exclude, then the limits.

    `--include`/`--exclude` pick exact slots, so they cannot be combined with each other nor with
    `--num_nodes`/`--num_gpus` (which would silently override the pick).
    """
    if include_spec and exclude_spec:
        raise LauncherError("--include and --exclude cannot be used together; pick one")
    if (include_spec or exclude_spec) and (num_nodes is not None or num_gpus is not None):
        flag = "--include" if include_spec else "--exclude"
        raise LauncherError(f"{flag} cannot be combined with --num_nodes/--num_gpus; "
                            f"name the slots in {flag} instead")
    if include_spec:
        resources = include(resources, include_spec)
    elif exclude_spec:
        resources = exclude(resources, exclude_spec)
    resources = limit(resources, num_nodes, num_gpus, source)
    if not resources:
        raise LauncherError(f"no slots left after the filters on {source}")
    return resources
