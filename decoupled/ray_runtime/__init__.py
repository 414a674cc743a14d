"""Ray runtime: stage actors, the controller and the two data planes (Ray calls, torch.distributed)."""
