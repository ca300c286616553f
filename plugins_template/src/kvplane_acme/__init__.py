"""Example kvplane platform for the fictitious Acme accelerator.

An Acme "device" here is torch on the host CPU under its own platform name, so the
example runs anywhere; a real vendor replaces the torch calls with its own runtime.
"""

__version__ = "0.1.0"
