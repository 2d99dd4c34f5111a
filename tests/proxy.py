"""The test kit's proxy and proxied cluster now live in the package (peer/testkit/proxy.py); re-exported here."""

from peer.testkit.proxy import FAST_ENV, ProxiedCluster, Proxy, empty_base_tables, proxied_cluster

__all__ = ["FAST_ENV", "ProxiedCluster", "Proxy", "empty_base_tables", "proxied_cluster"]
