"""Whether this replica is the active one, for work the operator does outside kopf's handlers (the progress
loop). kopf pauses its handlers on its own when a peer with a higher (or the same) priority is alive; the
progress loop must pause with them, or a standby replica would scrape and write status next to the active
one. This applies kopf's rule to the same peering objects kopf keeps alive:

- a peer is alive while `lastseen + lifetime` is in the future;
- this replica is paused while any other live peer has a priority >= its own.

Standalone (`--standalone`): always active.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Iterable, Mapping, Optional

from .kube import ApiError, KubeApi

log = logging.getLogger(__name__)
PEERING_GROUP = "kopf.dev/v1"


def _parse(ts: Optional[str]) -> Optional[dt.datetime]:
    if not ts:
        return None
    try:
        t = dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def peers_allow(peers: Mapping[str, dict], identity: str, priority: int, now: dt.datetime | None = None) -> bool:
    """True when no other live peer in this peering object has priority >= ours."""
    now = now or dt.datetime.now(dt.timezone.utc)
    for peer_id, info in (peers or {}).items():
        if peer_id == identity or not isinstance(info, dict):
            continue
        lastseen = _parse(info.get("lastseen")) or now
        if lastseen + dt.timedelta(seconds=int(info.get("lifetime", 60))) <= now:
            continue  # dead
        if int(info.get("priority", 0)) >= priority:
            return False
    return True


class PeeringGate:
    def __init__(self, api: KubeApi | None, *, standalone: bool, name: str, identity: Optional[str],
                 priority: int, namespaces: Iterable[str] = (), mandatory: bool = True):
        self.api = api
        self.standalone = standalone
        self.name = name
        self.identity = identity
        self.priority = priority
        self.namespaces = tuple(namespaces)
        self.mandatory = mandatory
        self._last: Optional[bool] = None

    def _paths(self) -> list[str]:
        if not self.namespaces:
            return [f"/apis/{PEERING_GROUP}/clusterkopfpeerings/{self.name}"]
        return [f"/apis/{PEERING_GROUP}/namespaces/{ns}/kopfpeerings/{self.name}" for ns in self.namespaces]

    async def active(self) -> bool:
        if self.standalone or self.api is None:
            return True
        if not self.identity:
            return True  # started via `kopf run`: identity unknown, kopf alone decides
        result = True
        try:
            for path in self._paths():
                obj = await self.api.get(path)
                if obj is None:
                    # kopf pauses when a mandatory peering object is missing, runs standalone otherwise
                    result = result and not self.mandatory
                    continue
                result = result and peers_allow(obj.get("status") or {}, self.identity, self.priority)
        except ApiError as exc:
            if exc.status == 404 and not self.mandatory:  # peering CRD not installed
                result = True
            else:
                log.warning("cannot read peering %r (%s); pausing the progress loop", self.name, exc)
                result = False
        if result != self._last:
            log.info("progress loop %s (peering %r, priority %d)", "active" if result else "paused",
                     self.name, self.priority)
            self._last = result
        return result
