"""Nova replicas on Ray Serve: ``nova serve --replicas N`` and ``serve run deploy/serve.yaml``.

An application of two deployments: ``NovaReplica`` x N (each runs the whole ``nova serve`` app,
``nova.server.app.create_app`` over its own ``AsyncEngine``, in-process) and one ``NovaIngress``
(the HTTP entry: it computes a request's session key and forwards the raw request to a replica
chosen by ``NovaRouter``, a consistent-hash ring keyed by replica rank with power-of-two-choices
spill when a session's replica is saturated).

Modules that import Ray: ``router``, ``replica``, ``ingress``, ``app``, ``cli``. The others are
Ray-free (plain logic, tested without a cluster): ``config`` (flags and Serve options),
``ring`` (the hash ring), ``session`` (session keys), ``asgi`` (driving an ASGI app without a
socket), ``promtext`` (merging Prometheus text), ``state`` (the ingress process's shared
registry and metrics). Importing this package imports nothing else.
"""
