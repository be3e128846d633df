"""Reference implementations the benchmarks measure lit_qlearn against, each written as its
source writes it (a CORL script, the NTK authors' recipe, Stable-Baselines3 at the zoo's
settings, a hand-written PyTorch loop): kept apart from the benchmarks' own code, so that a
benchmark script reads as its experiment and a baseline can be checked against its source
on its own."""
