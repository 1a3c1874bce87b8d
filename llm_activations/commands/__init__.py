"""The subcommands besides extract: validate, inspect, plan and merge."""
