"""Mesh construction and logical-axis -> PartitionSpec rules.

Parameters carry their logical axis names as `logical_axes` metadata (see jaxinfer/model.py);
the sharding issue maps them onto the mesh axes ("data", "seq", "model").
"""
