"""The cervical models: the 3D UNet segmenter and the fracture classifiers."""
