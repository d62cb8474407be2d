"""Run configs, allocation config, quality gates, recipes and their validators."""
