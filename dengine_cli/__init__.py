"""dengine: how much memory VMs really need, computed from hypervisor memory dumps."""

__version__ = "0.1.0"
