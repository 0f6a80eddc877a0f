"""The one training engine every method plugs into: loop, schedule, checkpoints, tracking."""
