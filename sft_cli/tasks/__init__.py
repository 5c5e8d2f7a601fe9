"""Tasks: the interface (base), one module per task, their specs (plain data) and the registry.

Kept empty so that reading a task's spec (`sft runs`, `sft init`) loads no model code: the registry
(`sft_cli.tasks.registry`) imports every task module.
"""
