"""Reading what the Prefect API recorded: flow-run trees, task-run states, waiting for records."""
