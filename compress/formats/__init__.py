"""Stored formats, one file each: bit streams, group-quantized weights with their statistics and
outliers, and the packed file that holds them. A reader rebuilds bit for bit the weights that were
evaluated; bits/param is counted from the file's bytes."""
