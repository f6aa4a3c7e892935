"""RSNA 2022 Cervical Spine Fracture Detection: the task, its generator, CT windows, the vertebra
segmentation (stage 02), the vertebra crops (03) and the fracture classifiers (04)."""
