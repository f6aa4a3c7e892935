"""SPIDER: public lumbar MRI segmentation data (.mha images and masks): generator, measurements, model."""
