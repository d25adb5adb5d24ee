"""One short training loop per LSDM stage: autoencoder, diffusion U-Net, feature classifiers."""
