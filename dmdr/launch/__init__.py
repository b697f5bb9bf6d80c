"""Launchers for `dmdr train` on clusters.

`dmdr.launch.torchx` is the TorchX component (``torchx run ... dmdr.launch.torchx:train``);
it needs the optional extra ``dmdr[torchx]``. The Helm chart lives in charts/dmdr.
"""
