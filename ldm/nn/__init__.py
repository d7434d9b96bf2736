"""Networks only (no training logic): autoencoder, discriminator, LPIPS, UNet, DiT, attention, conditioners."""
