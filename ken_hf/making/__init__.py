"""How a subnetwork is made: the plan and the step, the base a fine-tune came from,
the drivers (a model in place, checkpoint to checkpoint, sharded) and the processes
that share the work.
"""
