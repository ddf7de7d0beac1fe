"""Every command of the plugin, run as ``python -m espnet_plugin.bin.<name>``.

``asr_train``, ``asr_inference``, ``lm_train``, ``lm_calc_perplexity``: ESPnet's own programs,
after the plugin's classes are registered. ``benchmark_scan``, ``benchmark_encoder``,
``benchmark_decoder``, ``benchmark_chunking``, ``profile_kv_cache``: the plugin's benchmarks and
profiler (:mod:`espnet_plugin.benchmarks`). ``build_cpu_kernels``: compile the fused CPU kernels
now (tools/install.sh does; :mod:`espnet_plugin.nets.cpu_kernels`). The recipe's own steps are
``python -m espnet_plugin.recipe.<step>``.
"""
