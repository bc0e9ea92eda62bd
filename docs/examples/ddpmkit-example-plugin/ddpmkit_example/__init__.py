"""ddpmkit-example-plugin: a sigmoid noise schedule and a residual ConvNet denoiser for ddpmkit.

ddpmkit finds this package through the entry point ``example`` in the group ``ddpmkit``, which
names :mod:`ddpmkit_example.hooks`. Nothing here imports torch until a component is built.
"""

__version__ = "0.1.0"
