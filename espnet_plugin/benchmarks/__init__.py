"""Benchmarks and profilers: each times the plugin's parts against a peer, side by side in one
run, prints a table and writes JSON. Their commands are ``python -m espnet_plugin.bin.<name>``;
timing and the machine description are shared (:mod:`espnet_plugin.benchmarks.timing`)."""
