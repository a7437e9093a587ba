"""Training: one run as a library call (`run.train(cfg)`), the two-stage DeepSpeed loop (`loop.Trainer`), the run
directory's lock, device prefetch, the mixture of catalogues' rules and the transfer=auto driver."""
