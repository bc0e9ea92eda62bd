"""The runtime: the device, speed modes, memory limits, multi-process training and units."""
