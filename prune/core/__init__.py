"""Stage-free basics: errors, typed records, config sections, metrics, tables, console output."""
