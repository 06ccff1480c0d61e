"""How Ray Serve routes requests to the image classifier's replicas (kept apart from the door so
that Ray's proxies, which import it, load no torch).

Ray's default router sends a proxy's requests to the replica on the proxy's own node until that
replica holds ``max_ongoing_requests``. For image requests that piles the traffic on one node: its
replica's own queue bound (``max_queued_images``) refuses work with a 503 while a replica on
another node idles. ``SpreadingRouter`` is Ray's power-of-two-choices router without that
preference: each request goes to the less busy of two replicas, wherever they run.
"""

from __future__ import annotations

from typing import Any

# Ray 2.60 exports the router's base classes from ray.serve.request_router, but its default
# router only from here (the path Ray's own default, DEFAULT_REQUEST_ROUTER_PATH, names).
from ray.serve._private.request_router import PowerOfTwoChoicesRequestRouter

ROUTER_PATH = "handler.doors.ray_routing:SpreadingRouter"


class SpreadingRouter(PowerOfTwoChoicesRequestRouter):
    """Power of two choices over every replica, on any node."""

    def initialize_state(self, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        # LocalityMixin's switches: set from Ray's proxy settings when the router is made.
        self._prefer_local_node_routing = False
        self._prefer_local_az_routing = False
