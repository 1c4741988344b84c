"""Attention kernels (TPU Mosaic, GPU Triton), their pure-jnp references, and backend dispatch.

Filled by the kernel issue; until then the model's attention is `jaxinfer.attention.dense_attend`.
"""
