"""FLUX.2 [klein] (4B and 9B, distilled and base): transformer, VAE wrapper and pipeline."""
