"""Live handoff: a running VM's migration stream carried to a host that holds its base, sending
only what the base does not hold (``schemas/handoff-v1.md``)."""
