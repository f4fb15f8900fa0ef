"""Kernel-backed modules and the CPU/GPU ops they call, one per stored format in compress.formats,
each checked against that format's plain-torch reference. (Empty until the packed formats get
kernels; nothing here may be imported by the layers below it.)"""
