"""The node's composition, sans-IO: what a node does, written against a typed host.

Nothing here opens a socket, touches RocksDB or reads a clock: `zq/io/` is the real host (poll loop,
sockets, RocksDB, zeroconf, metrics) and `zq/sim/` a simulated one (network, disk, clock), and
both run this code. Importing `zq.node` loads only the standard library.
"""
