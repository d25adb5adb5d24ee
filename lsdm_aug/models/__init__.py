"""Networks of LSDM, built from MONAI's generative components: autoencoder, SPADE U-Net, feature classifiers."""
