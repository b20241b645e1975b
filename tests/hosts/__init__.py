"""Hosts and their faults: a copy across real hosts (network namespaces on a bridge, each running
its own Ray: `namespaces`), `ray up` on premises over SSH into them, hosts lost under load, a node
lost on a simulated cluster, and each worker role killed under load. The drivers run inside a
host's namespace (`python -m tests.hosts.copy_driver`, `python -m tests.hosts.fault_driver`)."""
