"""The core layer: what the stages and the seams share. It imports nothing outside ftx.core (a test walks the
imports): config and errors, the cache and atomic files, model loading and logit comparison, adapter and GGUF
checks, process supervision, packaged resources."""
