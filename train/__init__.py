"""Distributed GAN training on MNIST with Hugging Face Accelerate."""
