"""Ray runtime: stage actors, the controller and the data planes (Ray calls, torch.distributed)."""
