"""`fne-bench`: one module per subcommand (step, buffer, ema, data; the sampler's is fne_kernels.bench_sampler),
their shared helpers in `common`, the dispatch in `cli`."""
